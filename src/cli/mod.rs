//! The command line: clap definitions and dispatch. This is the only place that turns
//! errors into messages and exit codes.

mod init;
mod publish;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::fleet::Fleet;

#[derive(Debug, Parser)]
#[command(name = "bento", version, about = "Pull-based fleet manager for NixOS")]
pub struct Cli {
    /// The fleet repo (default: the current directory or the nearest parent with bento.toml)
    #[arg(long, global = true, env = "BENTO_FLEET", value_name = "DIR")]
    pub fleet: Option<PathBuf>,

    /// More log output (-v: debug, -vv: trace); BENTO_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new fleet repo with one example host
    Init(init::Args),
    /// Publish every host's configuration into its SFTP chroot
    Publish(publish::Args),
    /// Set up and check the SFTP server (accounts, sshd, NixOS module)
    #[command(subcommand)]
    Server(server::Command),
}

/// Exit status for errors that stop a command.
pub const EXIT_ERROR: u8 = 1;

pub fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "bento=info",
        1 => "bento=debug",
        _ => "bento=trace",
    };
    let filter = EnvFilter::try_from_env("BENTO_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Init(args) => init::run(args),
        Command::Publish(args) => publish::run(cli.fleet, args),
        Command::Server(cmd) => server::run(cli.fleet, cmd),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Loads the fleet named by `--fleet`/`BENTO_FLEET`, or found from the current directory.
pub fn load_fleet(fleet: Option<PathBuf>) -> anyhow::Result<Fleet> {
    let start = match fleet {
        Some(dir) => dir,
        None => std::env::current_dir()?,
    };
    Ok(Fleet::find(&start)?)
}
