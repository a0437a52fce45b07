//! Memory of loading a large inventory: `zone-ingress validate` on a generated stream of
//! dataplanes, measured as the child's peak resident set (`getrusage(RUSAGE_CHILDREN)`).

use std::{path::PathBuf, process::Command};

/// Dataplanes in the generated inventory (about 200 bytes of YAML each).
const DATAPLANES: usize = 40_000;
/// Peak memory allowed per byte of inventory text, beyond a fixed base.
const PEAK_PER_BYTE: u64 = 16;
/// The daemon's own size before it reads anything.
const BASE: u64 = 32 << 20;

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zone-ingress-inventory-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// One document per dataplane, each with one inbound, over 5,000 services.
fn inventory(n: usize) -> String {
    let mut text = String::with_capacity(n * 220);
    for i in 0..n {
        text.push_str(&format!(
            "type: Dataplane\nmesh: default\nname: dp-{i}\nnetworking:\n  address: 198.{}.{}.{}\n  inbound:\n  - port: {}\n    \
             tags:\n      kuma.io/service: svc-{}\n      kuma.io/zone: east\n      version: v{}\n---\n",
            18 + ((i >> 16) & 1),
            (i >> 8) & 255,
            i & 255,
            8000 + i % 1000,
            i % 5000,
            i % 3
        ));
    }
    text
}

#[test]
fn a_large_inventory_loads_in_memory_proportional_to_its_text() {
    let dir = scratch();
    let zi = dir.join("zoneingress.yaml");
    std::fs::write(
        &zi,
        "type: ZoneIngress\nname: zi-1\nnetworking:\n  address: 127.0.0.1\n  port: 10001\n  admin:\n    port: 9901\n",
    )
    .expect("zone ingress file");
    let inv = dir.join("dataplanes.yaml");
    let text = inventory(DATAPLANES);
    std::fs::write(&inv, &text).expect("inventory file");
    let out = Command::new(env!("CARGO_BIN_EXE_zone-ingress"))
        .args(["validate", "--dataplane-file"])
        .arg(&zi)
        .arg("--dataplanes")
        .arg(&inv)
        .output()
        .expect("run zone-ingress validate");
    let log = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "validate failed:\n{log}");
    assert!(log.contains(&format!("dataplanes={DATAPLANES}")), "{log}");
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct.
    let usage = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()), 0);
        usage.assume_init()
    };
    let peak = u64::try_from(usage.ru_maxrss).expect("ru_maxrss") * 1024;
    let size = text.len() as u64;
    eprintln!(
        "inventory of {DATAPLANES} dataplanes, {:.1} MiB: validate peaked at {:.1} MiB ({:.1}× the text)",
        size as f64 / f64::from(1 << 20),
        peak as f64 / f64::from(1 << 20),
        peak as f64 / size as f64
    );
    assert!(
        peak <= BASE + PEAK_PER_BYTE * size,
        "validate peaked at {:.1} MiB for {:.1} MiB of inventory (bound {PEAK_PER_BYTE}× + {} MiB)",
        peak as f64 / f64::from(1 << 20),
        size as f64 / f64::from(1 << 20),
        BASE >> 20
    );
    let _ = std::fs::remove_dir_all(&dir);
}
