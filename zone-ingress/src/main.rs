//! `zone-ingress`: parses the command line, sets up logging and calls the library.

use std::process::ExitCode;

use clap::Parser as _;
use zone_ingress::cli::{Cli, Command};

fn main() -> ExitCode {
    zone_ingress::sys::tune_allocator();
    let cli = Cli::parse();
    zone_ingress::cli::init_tracing(&cli);
    let result = match cli.command {
        Command::Run(args) => zone_ingress::app::run(args),
        Command::Validate(args) => zone_ingress::app::validate(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}
