//! Builds the kernel programs (`zone-ingress-ebpf`, nightly, `bpfel-unknown-none`) with aya-build
//! and leaves the object in `OUT_DIR`, where `splice::kernel` embeds it with `include_bytes_aligned!`.
//! `cargo xtask build-ebpf` runs this same build; there is no second path.
//!
//! `AYA_BUILD_SKIP=1` skips it (then the daemon embeds an empty object and `--splice kernel`
//! fails at load with a clear error); `cargo xtask setup` installs what the build needs.

use std::path::PathBuf;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("no workspace above {}", manifest_dir.display()))?
        .join("zone-ingress-ebpf");
    let root_dir = ebpf_dir.to_str().context("non-UTF-8 workspace path")?;
    println!("cargo:rerun-if-changed={root_dir}");
    // A build with the object skipped must not be taken for a full one afterwards.
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("zone-ingress-ebpf");
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // Keep `include_bytes_aligned!` compiling; the loader reports the empty object.
        std::fs::write(&out, b"")?;
        return Ok(());
    }
    aya_build::build_ebpf(
        [aya_build::Package { name: "zone-ingress-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` (nightly rust-src, bpf-linker)")
}
