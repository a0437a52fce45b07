//! `cargo xtask test`: sets up, then runs every check: `cargo fmt --check`, clippy (warnings are
//! errors), unit tests, the eBPF build, and the privileged integration tests (network
//! namespaces, real kernel programs) one at a time.
//! All failures are reported together at the end.

use std::process::Command;

use clap::Parser;
use xtask::{ENV_ZONE_INGRESS_BIN, status, workspace_root};

#[derive(Debug, Parser)]
pub struct Options {
    /// Only run tests whose name contains this (passed to the test binaries).
    pub filter: Option<String>,
    /// Skip the unit tests.
    #[arg(long)]
    pub skip_unit: bool,
}

pub fn test(opts: &Options) -> anyhow::Result<()> {
    crate::setup::setup(&crate::setup::Options::default())?;
    let root = workspace_root();
    let mut failures = Vec::new();
    let filter: Vec<String> = opts.filter.iter().cloned().collect();

    // Format and lints first (a run with a filter is a developer's loop: skipped there).
    if opts.filter.is_none() {
        let fmt = status(Command::new("cargo").current_dir(&root).args(["fmt", "--all", "--check"]))?;
        if !fmt.success() {
            failures.push("cargo fmt --check (run `cargo fmt --all`)");
        }
        let clippy = status(Command::new("cargo").current_dir(&root).args([
            "clippy",
            "--release",
            "--workspace",
            "--exclude",
            "zone-ingress-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        if !clippy.success() {
            failures.push("cargo clippy");
        }
    }
    // The daemon binary the integration tests and the demo run (built with its eBPF object).
    let built = status(Command::new("cargo").current_dir(&root).args(["build", "--release", "-p", "zone-ingress"]))?;
    if !built.success() {
        anyhow::bail!("building the daemon failed");
    }
    let bin = xtask::target_dir().join("release/zone-ingress");

    if !opts.skip_unit {
        let s = status(
            Command::new("cargo")
                .current_dir(&root)
                .args(["test", "--workspace", "--exclude", "zone-ingress-tests", "--exclude", "zone-ingress-ebpf", "--"])
                .args(&filter),
        )?;
        if !s.success() {
            failures.push("unit tests");
        }
    }
    // Privileged tests: one at a time (they create namespaces and load programs).
    let s = status(
        Command::new("cargo")
            .current_dir(&root)
            .args(["test", "--release", "--no-fail-fast", "-p", "zone-ingress-tests", "--"])
            .args(&filter)
            .args(["--test-threads=1"])
            .env(ENV_ZONE_INGRESS_BIN, &bin)
            .env("RUST_BACKTRACE", "1"),
    )?;
    if !s.success() {
        failures.push("privileged integration tests");
    }
    // The benchmark's quick mode: every system once, briefly; it asserts that bytes flowed and
    // matched (SHA-256 through each path), never a speed.
    if opts.filter.is_none() {
        let s = status(Command::new("cargo").current_dir(&root).args(["xtask", "bench", "--quick"]))?;
        if !s.success() {
            failures.push("bench --quick");
        }
    }
    if failures.is_empty() {
        eprintln!("xtask test: all suites passed");
        Ok(())
    } else {
        anyhow::bail!("failed: {}", failures.join(", "))
    }
}
