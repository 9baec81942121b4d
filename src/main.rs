#![forbid(unsafe_code)]
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = bento::cli::Cli::parse();
    bento::cli::init_logging(cli.verbose, cli.quiet);
    bento::cli::run(cli)
}
