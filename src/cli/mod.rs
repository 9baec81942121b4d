//! The command line: clap definitions and dispatch. This is the only place that turns
//! errors into messages and exit codes.

mod agent;
mod build;
mod builds;
mod completions;
mod diff;
mod flake_update;
mod init;
mod keygen;
mod log;
mod publish;
// rollout (#13): --on, waves, trigger, rollback, waiting.
mod rollback;
mod rollout;
mod secret;
mod select;
mod server;
mod status;
mod trigger;
mod wait;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::server::fleet::Fleet;

#[derive(Debug, Parser)]
#[command(name = "bento", version, about = "Pull-based fleet manager for NixOS")]
pub struct Cli {
    /// The fleet repo (default: the current directory or the nearest parent with bento.toml)
    #[arg(long, global = true, env = "BENTO_FLEET", value_name = "DIR")]
    pub fleet: Option<PathBuf>,

    /// More log output (-v: debug, -vv: trace); BENTO_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only results and errors: no progress, notes or informational log lines
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new fleet repo with one example host
    Init(init::Args),
    /// Create the fleet's signing key (ed25519, OpenSSH format)
    Keygen(keygen::Args),
    /// Publish every host's configuration into its SFTP chroot
    Publish(publish::Args),
    /// Build every host's system on this server and record what each host should run
    Build(build::Args),
    /// Show the state of every host: up to date, pending, failing, rolled back, silent…
    Status(status::Args),
    /// Show a host's past runs, or one run's full log
    Log(log::Args),
    /// Show what will change on each host: its running system against the expected one
    Diff(diff::Args),
    /// Update the lock files of every flake directory in the fleet
    FlakeUpdate(flake_update::Args),
    /// Publish wave by wave ([rollout] waves), halting at the first failing host
    Rollout(rollout::Args),
    /// Start the selected hosts' agent runs now (ssh, or [server] trigger_command)
    Trigger(trigger::Args),
    /// Make a kept earlier version live again on hosts, as a new version
    Rollback(rollback::Args),
    /// Encrypted secrets in the fleet repo: edit, show, rekey
    #[command(subcommand)]
    Secret(secret::Command),
    /// Set up and check the SFTP server (accounts, sshd, NixOS module)
    #[command(subcommand)]
    Server(server::Command),
    /// The machine-side agent (runs on each NixOS host)
    #[command(subcommand)]
    Agent(agent::Command),
    /// Print shell completions (bash, zsh, fish, …) for bento
    Completions(completions::Args),
    /// Print bento's man page (generated from these definitions)
    Man(completions::ManArgs),
}

/// Exit status for errors that stop a command.
pub const EXIT_ERROR: u8 = 1;

pub fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    crate::sys::output::set_quiet(quiet);
    let default = match (quiet, verbose) {
        (true, _) => "bento=warn",
        (false, 0) => "bento=info",
        (false, 1) => "bento=debug",
        (false, _) => "bento=trace",
    };
    let filter = EnvFilter::try_from_env("BENTO_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(crate::sys::output::color_on(
            std::io::stderr().is_terminal(),
        ))
        .with_target(false)
        .without_time()
        .init();
}

pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Init(args) => init::run(args),
        Command::Keygen(args) => keygen::run(args),
        Command::Publish(args) => publish::run(cli.fleet, args),
        Command::Build(args) => build::run(cli.fleet, args),
        Command::Status(args) => status::run(cli.fleet, args),
        Command::Log(args) => log::run(cli.fleet, args),
        Command::Diff(args) => diff::run(cli.fleet, args),
        Command::FlakeUpdate(args) => flake_update::run(cli.fleet, args),
        Command::Rollout(args) => rollout::run(cli.fleet, args),
        Command::Trigger(args) => trigger::run(cli.fleet, args),
        Command::Rollback(args) => rollback::run(cli.fleet, args),
        Command::Secret(cmd) => secret::run(cli.fleet, cmd),
        Command::Server(cmd) => server::run(cli.fleet, cmd),
        Command::Agent(cmd) => agent::run(cmd),
        Command::Completions(args) => completions::run(args),
        Command::Man(args) => completions::man(args),
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
