//! Process signals, with kuma-dp's meanings (docs/operations.md#signals-and-drain):
//!
//! - SIGTERM, SIGINT: shut down: report `TERMINATING`, stop accepting, let established flows
//!   run for the drain time, then close the rest and exit 0;
//! - SIGHUP: reload the configuration files;
//! - SIGUSR2: drain the listener (stop accepting) and keep running;
//! - SIGQUIT: hand over: stop accepting and exit at once, leaving the packet-level flows
//!   running in the kernel for the next daemon to adopt (docs/operations.md#restarts-and-upgrades).

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::info;

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM or SIGINT (the signal's name).
    Shutdown(&'static str),
    /// SIGHUP.
    Reload,
    /// SIGUSR2.
    DrainListeners,
    /// SIGQUIT.
    Handover,
}

/// The handled signals. Creating it installs the handlers, so the default actions (terminate)
/// no longer apply.
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr2: Signal,
    quit: Signal,
}

impl Signals {
    /// Installs the handlers (inside a tokio runtime).
    ///
    /// # Errors
    /// A handler could not be installed.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    /// The next signal, logged.
    pub async fn next(&mut self) -> Event {
        let event = tokio::select! {
            _ = self.term.recv() => Event::Shutdown("SIGTERM"),
            _ = self.int.recv() => Event::Shutdown("SIGINT"),
            _ = self.hup.recv() => Event::Reload,
            _ = self.usr2.recv() => Event::DrainListeners,
            _ = self.quit.recv() => Event::Handover,
        };
        match event {
            Event::Shutdown(signal) => info!(signal, "shutting down"),
            Event::Reload => info!(signal = "SIGHUP", "reloading the configuration"),
            Event::DrainListeners => info!(signal = "SIGUSR2", "draining the listener"),
            Event::Handover => {
                info!(signal = "SIGQUIT", "exiting now; packet-level flows stay for the next daemon");
            }
        }
        event
    }
}
