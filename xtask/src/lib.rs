//! Helpers shared by the xtask subcommands.

use std::{
    path::PathBuf,
    process::{Command, ExitStatus},
};

use anyhow::{Context as _, bail};

/// The toolchain that builds the eBPF crate (never a dated one: only the installed nightly exists).
pub const NIGHTLY: &str = "nightly";
/// bpf-linker release known to work with aya 0.14 and LLVM 22 (README.md#requirements).
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-deny release for `cargo deny check licenses bans sources` (`deny.toml`).
pub const CARGO_DENY_VERSION: &str = "0.20.2";
/// kubernetes-validate release (PyPI) that checks `deploy/kubernetes/` against the Kubernetes
/// API schemas it ships (no cluster needed).
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// Overrides where the daemon binary is looked up by the privileged tests and the demo.
pub const ENV_ZONE_INGRESS_BIN: &str = "ZONE_INGRESS_BIN";

/// `cargo build` arguments for the release daemon and the test harness's binaries (benchtool,
/// demo), selected together: cargo unifies features across the packages of one invocation, and
/// the harness enables some of tokio's and tonic's that the daemon alone does not. Building
/// the daemon alone would give its library and their dependents another hash, compiled once for
/// the binary and again for the tests, the demo and the bench.
pub const BUILD_RELEASE: &[&str] = &["build", "--release", "-p", "zone-ingress", "-p", "zone-ingress-tests"];

/// `cargo`, in the workspace root, without the variables `cargo run` gave this process
/// (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...). Some build scripts (ring's) ask to rerun when
/// these change, so a nested build that inherited xtask's values would rebuild them and all
/// that depends on them (rustls, tonic, the daemon) once more than a plain `cargo build` does,
/// and again at the next plain one.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "OUT_DIR"
            )
        {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// Runs `cmd`, failing with the command line when it cannot start or exits non-zero.
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cmd` and returns its exit status.
pub fn status(cmd: &mut Command) -> anyhow::Result<ExitStatus> {
    cmd.status().with_context(|| format!("failed to start {cmd:?}"))
}

/// Runs `cmd` and returns its stdout (trimmed), failing on a non-zero exit.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
