//! `cargo xtask demo`: sets up, builds, and runs the demo binary of the test harness
//! (`tests/src/bin/demo.rs`), which builds the topology, routes real mTLS connections by SNI
//! through the spliced path, prints what happened, and cleans up.

use clap::Parser;
use xtask::{ENV_ZONE_INGRESS_BIN, exec};

#[derive(Debug, Parser)]
pub(crate) struct Options {
    /// Splice mode for the demo's ingress (`auto`: packet level, else sockmap, else userspace).
    #[arg(long, default_value = "auto")]
    pub splice: String,
    /// Take the routes from a control plane speaking Kuma's protocols (bootstrap + ADS) instead
    /// of an inventory file.
    #[arg(long)]
    pub control_plane: bool,
}

pub(crate) fn demo(opts: &Options) -> anyhow::Result<()> {
    crate::setup::setup(&crate::setup::Options::default())?;
    exec(xtask::cargo().args(xtask::BUILD_RELEASE))?;
    let mut cmd = xtask::cargo();
    cmd.args(["run", "--release", "-q", "-p", "zone-ingress-tests", "--bin", "demo", "--", "--splice", &opts.splice])
        .env(ENV_ZONE_INGRESS_BIN, xtask::target_dir().join("release/zone-ingress"));
    if opts.control_plane {
        cmd.arg("--control-plane");
    }
    exec(&mut cmd)
}
