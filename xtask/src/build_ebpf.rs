//! `cargo xtask build-ebpf`: builds the kernel object through the daemon's build script (the
//! one build path) and prints where it is.

use clap::Parser;
use xtask::exec;

#[derive(Debug, Parser)]
pub(crate) struct Options {
    /// Build in release mode.
    #[arg(long)]
    pub release: bool,
}

pub(crate) fn build_ebpf(opts: &Options) -> anyhow::Result<()> {
    crate::setup::setup(&crate::setup::Options::default())?;
    let mut cmd = xtask::cargo();
    cmd.args(["build", "--package", "zone-ingress"]);
    if opts.release {
        cmd.arg("--release");
    }
    exec(&mut cmd)?;
    let profile = if opts.release { "release" } else { "debug" };
    let build = xtask::target_dir().join(profile).join("build");
    let newest = std::fs::read_dir(&build)?
        .filter_map(Result::ok)
        .map(|e| e.path().join("out").join("zone-ingress-ebpf"))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    if let Some(obj) = newest {
        #[expect(clippy::print_stdout, reason = "the object's path is the command's output")]
        {
            println!("{}", obj.display());
        }
    }
    Ok(())
}
