//! The kernel programs' rare events in this log: the programs write them with aya-log-ebpf
//! (`zone-ingress-ebpf/src/rare.rs`: an option layout the packet splice does not translate, a
//! FIN/RST or hold report lost to a full ring, a redirect the kernel refused, a full SYN table),
//! aya-log reads them from the object's `AYA_LOGS` ring, and [`Bridge`] turns each record into a
//! tracing event with target `kernel` and the program's module in `program`.
//!
//! One thread waits on the ring (epoll) for the life of the process: it costs nothing while
//! the programs are quiet, and the programs log each kind at most once a second per CPU.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    time::Duration,
};

use tracing::{debug, error, info, warn};

use crate::{ebpf::Object, sys::epoll};

/// Starts forwarding the object's log records. Logged, never fatal: an object built without
/// the ring (or a ring already taken) only loses these lines; the counters stay.
pub fn start(object: &Object) {
    let logger = match aya_log::EbpfLogger::init_with_logger(&mut object.lock(), Bridge) {
        Ok(l) => l,
        Err(e) => {
            debug!(error = %e, "no log ring in the eBPF object; kernel events are only counted");
            return;
        }
    };
    let spawned = std::thread::Builder::new().name("ebpf-log".into()).spawn(move || {
        if let Err(e) = run(logger) {
            warn!(error = %e, "reading the eBPF programs' log stopped");
        }
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the thread that reads the eBPF programs' log");
    }
}

fn run(mut logger: aya_log::EbpfLogger<Bridge>) -> io::Result<()> {
    let ep = epoll::create()?;
    epoll::add(ep.as_fd(), logger.as_raw_fd(), libc::EPOLLIN as u32, 0)?;
    let mut ready = [libc::epoll_event { events: 0, u64: 0 }; 1];
    loop {
        match epoll::wait(ep.as_fd(), &mut ready, Duration::from_secs(1)) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
            Ok(_) => logger.flush(),
        }
    }
}

/// A `log::Log` that writes into tracing, so the kernel's lines share the daemon's format,
/// filter (`RUST_LOG=kernel=...`) and output.
pub struct Bridge;

impl log::Log for Bridge {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let program = record.module_path().unwrap_or_else(|| record.target());
        let message = record.args();
        match record.level() {
            log::Level::Error => error!(target: "kernel", program, "{message}"),
            log::Level::Warn => warn!(target: "kernel", program, "{message}"),
            log::Level::Info => info!(target: "kernel", program, "{message}"),
            log::Level::Debug | log::Level::Trace => debug!(target: "kernel", program, "{message}"),
        }
    }

    fn flush(&self) {}
}
