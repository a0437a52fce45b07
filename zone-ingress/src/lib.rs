//! zone-ingress: a Kuma `ZoneIngress` data plane that routes cross-zone mTLS by SNI alone and
//! splices every later byte inside the kernel.
//!
//! (module map is filled in as the data path lands)
pub mod client_hello;
pub mod config;
pub mod routing;
pub mod sni;
