//! zone-ingress: a Kuma `ZoneIngress` data plane that routes cross-zone mTLS by SNI alone and
//! splices every later byte inside the kernel. The design, in prose: `docs/design.md`.
//!
//! # The data path
//!
//! ```text
//!  accept ──────► peek SNI ─────► route ──────► connect ────► handoff ─────────────► close
//!  server::       server::conn    routing       server::conn  splice::sockmap::      splice::sockmap::monitor
//!  listener       + client_hello  (SNI →        (round robin, handoff (SOCKHASH +    (RDHUP → drain check →
//!  (SO_REUSEPORT  (MSG_PEEK,      cluster →     next on        sk_skb verdict,       SHUT_WR; RST → RST), then a
//!   listeners)    never read)     endpoints)    failure)       zone-ingress-ebpf)    CloseReport to flows
//!                                                             └► splice::userspace (fallback, --splice userspace):
//!                                                                the relay returns its Closed to server::conn
//!  rejected before a backend: reject::RejectReason, counted and logged by server::conn
//! ```
//!
//! Backpressure of a spliced direction (`splice::sockmap::hold`, on the connection's monitor
//! thread, one per CPU up to 4): backlog toward the peer above 2 MiB → `HOLD` (the verdict keeps
//! skbs on the receiving socket, whose window closes) → peer's psock queue empty → the monitor
//! relays the held bytes, keeping the hold while they keep coming → 5 ms of light relay passes
//! → the verdict redirects again.
//!
//! # Modules
//! - [`app`]: the lifecycle (load → start → serve → reload → drain) and `validate`.
//! - [`cli`]: the command line (kuma-dp flag names), clap types only.
//! - [`config`]: the ZoneIngress file, the Dataplane inventory (and the XDP guard file's
//!   checker), validated with every problem reported at once.
//! - [`control_plane`]: control-plane mode: kuma-dp's bootstrap, the ADS stream, and the
//!   translation of listeners, clusters and endpoints into a route table.
//! - [`sni`]: Kuma's SNI formats (legacy tags, MeshService hash).
//! - [`routing`]: SNI → cluster → endpoints, round robin.
//! - [`client_hello`]: incremental ClientHello parser over peeked bytes.
//! - [`reject`]: why a connection is closed before a backend: label, log text, Envoy counter.
//! - [`server`]: the shared state ([`server::Ingress`], [`server::Snapshot`]), listeners, the
//!   per-connection task (accept → … → handoff), the metrics scrape.
//! - [`flows`]: the registry of open flows: owns each connection until its close is logged,
//!   behind `/connections` and the live byte counters.
//! - [`splice`]: the contract every mode keeps ([`splice::Closed`], [`splice::CloseReport`]),
//!   the sockmap splice and the userspace relay.
//! - [`ebpf`]: the eBPF object, loaded once, shared by the splice and the XDP guard.
//! - [`sys`]: socket options, `bpf(2)` map access ([`sys::BpfMap`]), epoll.
//!
//! # Operations
//!
//! ```text
//!  signal (TERM/INT: drain, HUP: reload, USR2: drain listener) ─┐
//!  reload (inotify + SIGHUP → settle → validate → swap Snapshot) ─┼─► app (serve loop) ─► server::Ingress
//!  admin (hyper: /ready /stats /stats/prometheus /config_dump     ─┘          ▲
//!         /connections /quitquitquit /drain_listeners) ── reads ──── server::Ingress::scrape
//! ```
//!
//! - [`admin`]: the admin HTTP server (loopback by default).
//! - [`metrics`]: counters and their Prometheus / Envoy `/stats` renderings (Envoy's names).
//! - [`reload`]: file watching (directories and their parents) and validated, atomic swaps.
//! - [`signal`]: SIGTERM/SIGINT, SIGHUP, SIGUSR2.
//! - [`xdp`]: the XDP guard in front of the listener (CIDR lists, SYN limit, early drops).
pub mod admin;
pub mod app;
pub mod cli;
pub mod client_hello;
pub mod config;
pub mod control_plane;
pub mod ebpf;
pub mod ebpf_log;
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
