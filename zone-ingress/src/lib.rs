//! zone-ingress: a Kuma `ZoneIngress` data plane that routes cross-zone mTLS by SNI alone and
//! splices every later byte inside the kernel.
//!
//! # The data path
//!
//! ```text
//!  accept ──► peek SNI ──► route ──► connect ──► handoff ──────────────► close
//!  server     client_hello routing    server      splice::kernel          splice::kernel (monitor:
//!  (SO_REUSEPORT  (MSG_PEEK,  (SNI →   (round robin, (SOCKHASH + sk_skb     RDHUP → drain check →
//!   listeners)   never read) cluster)  retry next)   verdict, zone-ingress-ebpf)  SHUT_WR; RST → RST)
//!                                                  └► splice::userspace (fallback / --splice userspace)
//! ```
//!
//! Backpressure of a spliced direction (`splice::kernel`, the connection's monitor thread, one
//! per CPU up to 4): backlog toward the peer above 2 MiB → `HOLD` (the verdict keeps skbs on the
//! receiving socket, whose window closes) → peer's psock queue empty → the monitor relays the
//! held bytes, keeping the hold while they keep coming → 5 ms of light relay passes → the
//! verdict redirects again.
//!
//! # Modules
//! - [`cli`]: command line (kuma-dp flag names), `run` and `validate`.
//! - [`config`]: the ZoneIngress file and the Dataplane inventory, validated with every problem
//!   reported at once.
//! - [`sni`]: Kuma's SNI formats (legacy tags, MeshService hash).
//! - [`routing`]: SNI → cluster → endpoints, round robin.
//! - [`client_hello`]: incremental ClientHello parser over peeked bytes.
//! - [`server`]: listeners, the per-connection task (accept → … → handoff).
//! - [`splice`]: the kernel splice and the userspace relay, with their close handling.
//! - [`sys`]: socket options, and lock-free BPF map element access (`BpfMap`).
//!
//! # Operations
//!
//! ```text
//!  signal (TERM/INT: drain, HUP: reload, USR2: drain listener) ─┐
//!  reload (inotify + SIGHUP → validate → swap Snapshot, rebind) ─┼─► cli::run loop ─► server::Ingress
//!  admin (hyper: /ready /stats /stats/prometheus /config_dump    ─┘        ▲
//!         /connections /quitquitquit /drain_listeners) ── reads ─── metrics + flows + splice maps
//! ```
//!
//! - [`admin`]: the admin HTTP server (loopback by default).
//! - [`metrics`]: counters and their Prometheus / Envoy `/stats` renderings (Envoy's names).
//! - [`flows`]: the registry of open flows behind `/connections` and the live byte counters.
//! - [`mapstat`]: BPF map occupancy for the metrics.
//! - [`reload`]: file watching and validated, atomic configuration swaps.
//! - [`signal`]: SIGTERM/SIGINT, SIGHUP, SIGUSR2.
//! - [`xdp`]: the XDP guard in front of the listener (CIDR lists, SYN limit, early drops).
pub mod admin;
pub mod app;
pub mod cli;
pub mod client_hello;
pub mod config;
pub mod ebpf;
pub mod flows;
pub mod metrics;
pub mod reject;
pub mod reload;
pub mod routing;
pub mod server;
pub mod signal;
pub mod sni;
pub mod splice;
pub mod sys;
pub mod xdp;
