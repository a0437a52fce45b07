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
//! # Modules
//! - [`cli`]: command line (kuma-dp flag names), `run` and `validate`.
//! - [`config`]: the ZoneIngress file and the Dataplane inventory, validated with every problem
//!   reported at once.
//! - [`sni`]: Kuma's SNI formats (legacy tags, MeshService hash).
//! - [`routing`]: SNI → cluster → endpoints, round robin.
//! - [`client_hello`]: incremental ClientHello parser over peeked bytes.
//! - [`server`]: listeners, the per-connection task (accept → … → handoff).
//! - [`splice`]: the kernel splice and the userspace relay, with their close handling.
//! - [`metrics`]: counters; [`sys`]: socket options; [`signal`]: SIGTERM/SIGINT.
pub mod cli;
pub mod client_hello;
pub mod config;
pub mod metrics;
pub mod routing;
pub mod server;
pub mod signal;
pub mod sni;
pub mod splice;
pub mod sys;
