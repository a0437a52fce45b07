//! `zone-ingress validate` on inputs in Kubernetes form: a ZoneIngress and a kubectl list of
//! Dataplanes mixed with a Universal document, with a DNS name that resolves (`localhost`), one
//! that cannot (`.invalid`, RFC 2606) and a Dataplane that breaks a rule. The usable ones load,
//! each skipped one is named in a warning, and a file that is not YAML is still refused.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

const ZONE_INGRESS: &str = "\
apiVersion: kuma.io/v1alpha1
kind: ZoneIngress
metadata:
  name: zi-1
  namespace: kuma-system
spec:
  networking:
    address: 127.0.0.1
    port: 10001
    advertisedAddress: 127.0.0.1
    advertisedPort: 10001
    admin:
      port: 9901
";

const DATAPLANES: &str = "\
apiVersion: v1
kind: List
items:
- apiVersion: kuma.io/v1alpha1
  kind: Dataplane
  mesh: default
  metadata:
    name: backend-1
    namespace: demo
    labels: {kuma.io/zone: east}
  spec:
    networking:
      address: localhost
      inbound:
      - port: 18080
        tags: {kuma.io/service: backend_demo_svc_8080}
- apiVersion: kuma.io/v1alpha1
  kind: Dataplane
  mesh: default
  metadata:
    name: backend-2
    namespace: demo
  spec:
    networking:
      address: backend-2.zone-ingress-test.invalid
      inbound:
      - port: 18080
        tags: {kuma.io/service: backend_demo_svc_8080}
metadata:
  resourceVersion: \"\"
---
type: Dataplane
mesh: default
name: vm-1
networking:
  address: 127.0.0.2
  inbound:
  - port: 70000
    tags: {kuma.io/service: vm}
---
type: Dataplane
mesh: default
name: vm-2
networking:
  address: 127.0.0.3
  inbound:
  - port: 18081
    tags: {kuma.io/service: vm}
";

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zone-ingress-config-forms-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn validate(zi: &Path, dps: &Path) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zone-ingress"))
        .args(["--log-format", "text", "validate", "--zone", "east", "--dataplane-file"])
        .arg(zi)
        .arg("--dataplanes")
        .arg(dps)
        .output()
        .expect("run zone-ingress validate");
    let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out, log)
}

#[test]
fn validate_reads_kubernetes_forms_and_names_the_dataplanes_it_skips() {
    let dir = scratch();
    let zi = dir.join("zoneingress.yaml");
    let dps = dir.join("dataplanes.yaml");
    std::fs::write(&zi, ZONE_INGRESS).expect("zone ingress file");
    std::fs::write(&dps, DATAPLANES).expect("inventory file");

    let (out, log) = validate(&zi, &dps);
    assert_eq!(out.status.code(), Some(0), "validate:\n{log}");
    // backend-1 (localhost) and vm-2 load; backend-2 and vm-1 are skipped, each named.
    assert!(log.contains("dataplanes=2"), "{log}");
    let unresolved = format!(
        "{}:25:16: warning: items[1].spec.networking.address: skipped Dataplane `backend-2.demo` (mesh \
         `default`): `backend-2.zone-ingress-test.invalid` does not resolve",
        dps.display()
    );
    assert!(log.contains(&unresolved), "expected {unresolved:?} in:\n{log}");
    let bad_port = format!(
        "{}:38:11: warning: networking.inbound[0].port: skipped Dataplane `vm-1` (mesh `default`): port must be \
         in the range [1, 65535]",
        dps.display()
    );
    assert!(log.contains(&bad_port), "expected {bad_port:?} in:\n{log}");
    assert!(!log.contains("backend-1.demo"), "backend-1 resolves and loads:\n{log}");

    // A file that is not YAML is still refused, with its position.
    std::fs::write(&dps, "items:\n- kind: Dataplane\n  metadata: {name: [x\n").expect("inventory file");
    let (out, log) = validate(&zi, &dps);
    assert_eq!(out.status.code(), Some(64), "validate:\n{log}");
    assert!(log.contains(&format!("{}:4:", dps.display())) && log.contains("invalid YAML"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
