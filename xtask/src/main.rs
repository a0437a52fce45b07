//! `cargo xtask <command>`: the project's tasks.

mod bench;
mod bench_xdp;
mod build_ebpf;
mod demo;
mod modgraph;
mod netns;
mod setup;
mod test;

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "xtask")]
enum Cli {
    /// Install what a fresh machine lacks (nightly rust-src, bpf-linker, Debian packages).
    Setup(setup::Options),
    /// Build the eBPF object (through the daemon's build script) and print its path.
    BuildEbpf(build_ebpf::Options),
    /// Set up, then run every test, privileged ones included (needs root).
    Test(test::Options),
    /// Set up, then run the built-in demo: namespaces, two mTLS dataplanes, routed and spliced.
    Demo(demo::Options),
    /// Benchmark zone-ingress against direct routing, HAProxy and nginx (needs root).
    Bench(bench::Options),
    /// Check that the daemon's top-level modules import each other without a cycle.
    Modgraph(modgraph::Options),
}

fn main() -> ExitCode {
    let result = match Cli::parse() {
        Cli::Setup(o) => setup::setup(&o),
        Cli::BuildEbpf(o) => build_ebpf::build_ebpf(&o),
        Cli::Test(o) => test::test(&o),
        Cli::Demo(o) => demo::demo(&o),
        Cli::Bench(o) => bench::bench(&o),
        Cli::Modgraph(o) => modgraph::modgraph(&o),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
