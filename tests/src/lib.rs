//! Harness for the privileged tests and the demo: network namespaces with veth links (addresses
//! from 198.18.0.0/15 and 2001:2::/48 only), a throwaway PKI, mTLS dataplane servers that hash
//! what they receive, clients, and the daemon run as a real process inside its namespace.
//!
//! Topology (`Topology::new`): client ns ─veth─ ingress ns ─veth─ dataplane ns k (k = 1..n)
//! - client      198.18.0.1/24   2001:2:0:0::1/64
//! - ingress     198.18.0.2/24   2001:2:0:0::2/64   and 198.18.k.1/24  2001:2:0:k::1/64
//! - dataplane k 198.18.k.2/24   2001:2:0:k::2/64

pub mod control_plane;
pub mod daemon;
pub mod guard;
pub mod netns;
pub mod ops;
pub mod pki;
pub mod raw;
pub mod stream;

/// Panics unless running as root: privileged tests must fail, not skip, without privilege.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "privileged tests need root (run `cargo xtask test` as root)");
}

/// A multi-thread runtime for one test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// The inventory of docs/design.md#sni-examples on the test topology: `backend` v1 on dataplane 1 and v2 on
/// dataplane 2 (port 8080), `redis` on dataplane 3 (6379), `web` NotReady on dataplane 3 (80).
/// With `v6`, the endpoints are the dataplanes' IPv6 addresses.
pub fn section5_inventory(v6: bool) -> String {
    let a = |k| netns::Topology::dataplane_addr(k, v6).to_string();
    format!(
        r#"items:
- type: Dataplane
  mesh: default
  name: backend-1
  creationTime: "2026-01-01T00:00:00Z"
  networking:
    address: "{a1}"
    inbound:
    - port: 8080
      servicePort: 18080
      tags:
        kuma.io/service: backend
        kuma.io/zone: east
        version: v1
- type: Dataplane
  mesh: default
  name: backend-2
  creationTime: "2026-01-01T00:00:01Z"
  networking:
    address: "{a2}"
    inbound:
    - port: 8080
      servicePort: 18080
      tags:
        kuma.io/service: backend
        kuma.io/zone: east
        version: v2
- type: Dataplane
  mesh: default
  name: redis-1
  creationTime: "2026-01-01T00:00:02Z"
  networking:
    address: "{a3}"
    inbound:
    - port: 6379
      tags:
        kuma.io/service: redis
    - port: 80
      state: NotReady
      tags:
        kuma.io/service: web
next: null
total: 3
"#,
        a1 = a(1),
        a2 = a(2),
        a3 = a(3)
    )
}

/// Dataplane names as they answer in the protocol (`stream::serve_one`).
pub const DP_NAMES: [&str; 3] = ["backend-1", "backend-2", "redis-1"];
