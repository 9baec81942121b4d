#![forbid(unsafe_code)]
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = bento::cli::Cli::parse_args();
    bento::cli::init_logging(cli.verbose, cli.quiet);
    bento::cli::run(cli)
}
