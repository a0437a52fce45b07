//! `cargo xtask test`: sets up, then runs every check: `cargo +nightly fmt --check`, clippy
//! (warnings are errors) on the host crates and on the eBPF crate for its BPF target,
//! `cargo deny` (licences, bans, sources), the module import graph, the eBPF build, the deployment
//! files (`deploy/`: against the built daemon, the Kubernetes API schemas and `systemd-analyze`),
//! unit tests and the unprivileged connection-path tests, and the privileged integration tests
//! (network namespaces, real kernel programs) one at a time.
//! All failures are reported together at the end.

use std::process::Command;

use clap::Parser;
use xtask::{ENV_ZONE_INGRESS_BIN, NIGHTLY, status, workspace_root};

#[derive(Debug, Parser)]
pub(crate) struct Options {
    /// Only run tests whose name contains this (passed to the test binaries).
    pub filter: Option<String>,
    /// Skip the unit tests.
    #[arg(long)]
    pub skip_unit: bool,
}

pub(crate) fn test(opts: &Options) -> anyhow::Result<()> {
    crate::setup::setup(&crate::setup::Options::default())?;
    let root = workspace_root();
    let mut failures = Vec::new();
    let filter: Vec<String> = opts.filter.iter().cloned().collect();

    // Format and lints first (a run with a filter is a developer's loop: skipped there).
    if opts.filter.is_none() {
        let fmt = status(xtask::cargo().args([&format!("+{NIGHTLY}"), "fmt", "--all", "--check"]))?;
        if !fmt.success() {
            failures.push("cargo +nightly fmt --check (run `cargo +nightly fmt --all`)");
        }
        let clippy = status(xtask::cargo().args([
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
        // The kernel programs, for their own target (the host build of that crate is a stub).
        let clippy_ebpf = status(
            xtask::cargo()
                .current_dir(root.join("zone-ingress-ebpf"))
                .args([
                    &format!("+{NIGHTLY}"),
                    "clippy",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                ])
                .args(["--", "-D", "warnings"])
                .env("CARGO_TARGET_DIR", xtask::target_dir().join("ebpf-clippy")),
        )?;
        if !clippy_ebpf.success() {
            failures.push("cargo clippy (eBPF crate)");
        }
        // Dependencies: licences, bans, sources (the advisories check needs the network). The
        // check reads the metadata of every platform's dependencies, which a build on this one
        // never downloads: fetch them first (from the registry, as the build does).
        let fetched = status(xtask::cargo().args(["fetch", "--locked"]))?;
        if !fetched.success() {
            failures.push("cargo fetch --locked (the dependencies of every platform, for cargo deny)");
        }
        let deny = status(xtask::cargo().args(["deny", "--offline", "check", "licenses", "bans", "sources"]))?;
        if !deny.success() {
            failures.push("cargo deny check licenses bans sources");
        }
        if let Err(e) = crate::modgraph::modgraph(&crate::modgraph::Options::default()) {
            eprintln!("xtask: {e:#}");
            failures.push("module import graph");
        }
    }
    // The daemon binary the integration tests and the demo run (built with its eBPF object).
    let built = status(xtask::cargo().args(xtask::BUILD_RELEASE))?;
    if !built.success() {
        anyhow::bail!("building the daemon failed");
    }
    let bin = xtask::target_dir().join("release/zone-ingress");

    // The deployment files, quick and without root: tests/tests/deploy.rs checks them against
    // the daemon just built (its flags, ports, the ConfigMap's ZoneIngress through `validate`,
    // the unit through `systemd-analyze verify`); kubernetes-validate checks the manifests
    // against the Kubernetes API schemas.
    if opts.filter.is_none() {
        let s = status(
            xtask::cargo()
                .args(["test", "--release", "-p", "zone-ingress-tests", "--test", "deploy"])
                .env(ENV_ZONE_INGRESS_BIN, &bin),
        )?;
        if !s.success() {
            failures.push("deployment files (tests/tests/deploy.rs)");
        }
        let mut manifests: Vec<_> = std::fs::read_dir(root.join("deploy/kubernetes"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml") && !p.ends_with("kustomization.yaml"))
            .collect();
        manifests.sort();
        let s = status(
            Command::new(crate::setup::kubernetes_validate_bin()).args(["--strict", "--quiet"]).args(&manifests),
        )?;
        if !s.success() {
            failures.push("kubernetes-validate deploy/kubernetes");
        }
    }
    if !opts.skip_unit {
        // The daemon's unit tests in release, with the packages of `BUILD_RELEASE`: the same
        // feature set, so they reuse its dependencies rather than build them all again in debug.
        // xtask's own in debug, like the xtask binary running this.
        let daemon = status(
            xtask::cargo()
                .args(["test", "--release", "-p", "zone-ingress", "-p", "zone-ingress-tests", "--lib", "--"])
                .args(&filter),
        )?;
        let tools = status(xtask::cargo().args(["test", "-p", "xtask", "--"]).args(&filter))?;
        if !daemon.success() || !tools.success() {
            failures.push("unit tests");
        }
    }
    // Privileged tests: one at a time (they create namespaces and load programs).
    let s = status(
        xtask::cargo()
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
        let s = status(xtask::cargo().args(["xtask", "bench", "--quick"]))?;
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
