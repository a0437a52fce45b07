//! `cargo xtask setup`: installs what a fresh machine lacks. Idempotent; seconds when all is there.
//!
//! - nightly `rust-src` (the eBPF crate is built with `-Z build-std=core`), and the nightly's
//!   `rustfmt` and `clippy` (the import grouping of `rustfmt.toml`, the eBPF crate's lints);
//! - `bpf-linker`, built against the nightly toolchain's own libLLVM (no LLVM package needed);
//! - `cargo-deny`, for the dependency licence, ban and source checks (`deny.toml`);
//! - the Debian packages the tests, the demo and the benchmark use (`systemd` for
//!   `systemd-analyze verify` of the unit in `deploy/systemd/`);
//! - `kubernetes-validate` (PyPI) in a virtualenv of its own, for the manifests in
//!   `deploy/kubernetes/`.
//!
//! `--build-tools-only` stops after the first two: what building the daemon needs
//! (`deploy/Dockerfile`).

use std::{
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::Parser;
use xtask::{BPF_LINKER_VERSION, CARGO_DENY_VERSION, KUBERNETES_VALIDATE_VERSION, NIGHTLY, exec, output};

/// Debian packages for the privileged tests and the demo (`ip`, `bpftool`, iperf3, openssl, `nft` for
/// packet loss in the packet-splice tests), and
/// for the deployment checks (`systemd-analyze`, the virtualenv of kubernetes-validate).
pub(crate) const TEST_PACKAGES: &[&str] =
    &["iproute2", "bpftool", "iperf3", "openssl", "procps", "systemd", "python3-venv", "nftables"];

#[derive(Debug, Parser, Default)]
pub(crate) struct Options {
    /// Extra Debian packages to install (the benchmark adds its peers).
    #[arg(long = "package")]
    pub packages: Vec<String>,
    /// Only what `cargo build --release -p zone-ingress` needs (the nightly's components and
    /// bpf-linker): the build stage of `deploy/Dockerfile`.
    #[arg(long)]
    pub build_tools_only: bool,
}

pub(crate) fn setup(opts: &Options) -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    if opts.build_tools_only {
        return Ok(());
    }
    cargo_deny()?;
    let mut pkgs: Vec<&str> = TEST_PACKAGES.to_vec();
    pkgs.extend(opts.packages.iter().map(String::as_str));
    debian_packages(&pkgs)?;
    kubernetes_validate()?;
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))
        .context("the nightly toolchain is required to build the eBPF programs")?;
    for component in ["rust-src", "rustfmt", "clippy"] {
        if installed.lines().any(|l| l.starts_with(component)) {
            continue;
        }
        eprintln!("setup: installing {component} for {NIGHTLY}");
        exec(Command::new("rustup").args(["component", "add", component, "--toolchain", NIGHTLY]))?;
    }
    Ok(())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// `cargo_home()/bin/<name>` is there and says it is `version`.
fn installed(name: &str, version: &str) -> bool {
    let bin = cargo_home().join("bin").join(name);
    output(Command::new(bin).arg("--version")).is_ok_and(|v| v.contains(version))
}

fn bpf_linker() -> anyhow::Result<()> {
    if installed("bpf-linker", BPF_LINKER_VERSION) {
        return Ok(());
    }
    // The LLVM bpf-linker links against must be the nightly's own (its major must match what
    // rustc emits). Read it instead of hard-coding it.
    let vv = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV printed no LLVM version")?;
    let major = llvm.split('.').next().unwrap_or(llvm);
    let sysroot = PathBuf::from(output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?);
    let lib = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.")))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    // PREFIX must outlive the build: the installed binary finds libLLVM through an rpath to it.
    let prefix = cargo_home().join("zone-ingress").join(format!("llvm-{llvm}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let soname = libllvm.file_name().context("libLLVM path has no file name")?;
    for name in [Path::new("libLLVM.so"), Path::new(soname)] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        symlink(&libllvm, &link).with_context(|| format!("symlinking {}", link.display()))?;
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about 80 s)", libllvm.display());
    exec(
        xtask::cargo()
            .args(["install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION, "--no-default-features"])
            .args(["--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix),
    )
    .or_else(|_| {
        // `--locked` can fail if the published lockfile pins something yanked; retry without.
        exec(
            xtask::cargo()
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features"])
                .args(["--features", &format!("llvm-{major}")])
                .env("LLVM_PREFIX", &prefix),
        )
    })
}

fn cargo_deny() -> anyhow::Result<()> {
    if installed("cargo-deny", CARGO_DENY_VERSION) {
        return Ok(());
    }
    eprintln!("setup: building cargo-deny {CARGO_DENY_VERSION} (about 3 min)");
    exec(xtask::cargo().args(["install", "cargo-deny", "--locked", "--version", CARGO_DENY_VERSION]))
}

/// The `kubernetes-validate` command, in its virtualenv under `$CARGO_HOME/zone-ingress/`.
pub(crate) fn kubernetes_validate_bin() -> PathBuf {
    cargo_home()
        .join("zone-ingress")
        .join(format!("kubernetes-validate-{KUBERNETES_VALIDATE_VERSION}"))
        .join("bin/kubernetes-validate")
}

fn kubernetes_validate() -> anyhow::Result<()> {
    let bin = kubernetes_validate_bin();
    if output(Command::new(&bin).arg("--version")).is_ok_and(|v| v.contains(KUBERNETES_VALIDATE_VERSION)) {
        return Ok(());
    }
    let venv = bin.parent().and_then(Path::parent).context("virtualenv path")?;
    eprintln!("setup: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} into {}", venv.display());
    // Debian's python3 (python3-venv above), whatever else is first on PATH.
    exec(Command::new("/usr/bin/python3").args(["-m", "venv", "--clear"]).arg(venv))?;
    exec(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
    ]))
}

fn is_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_ok_and(|s| s.contains("install ok installed"))
}

/// Installs the missing packages with apt-get (non-interactive).
pub(crate) fn debian_packages(pkgs: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !is_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {}", missing.join(" "));
    let install = |cmd: &mut Command| {
        exec(
            cmd.args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install(&mut Command::new("apt-get")).is_err() {
        exec(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
        install(&mut Command::new("apt-get"))?;
    }
    let still: Vec<&str> = missing.iter().copied().filter(|p| !is_installed(p)).collect();
    if !still.is_empty() {
        bail!("apt-get did not install {}", still.join(" "));
    }
    Ok(())
}
