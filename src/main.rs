#![forbid(unsafe_code)]
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = bento::cli::parse();
    bento::cli::init_logging(cli.verbose, cli.quiet);
    bento::cli::run(cli)
}
