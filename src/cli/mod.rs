//! The command line: clap definitions and dispatch. This is the only place that turns
//! errors into messages and exit codes.

mod agent;
// Issue #25: enrolment (host add, agent-config).
mod agent_config;
mod agent_enrol;
mod build;
mod builds;
mod completions;
mod diff;
mod dry_run;
mod editor;
// Exit statuses and the EXIT STATUS sections of --help and man pages (issue #25).
pub mod exit;
mod flake_update;
mod host;
mod init;
mod keygen;
mod log;
mod publish;
// rollout (#13): --on, waves, trigger, rollback, waiting.
mod rollback;
// Issue #24 item 3: the publisher's journal.
mod journal;
mod rollout;
mod secret;
mod select;
mod server;
mod status;
mod trigger;
mod versions;
mod wait;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::server::fleet::Fleet;

#[derive(Debug, Parser)]
#[command(name = "bento", version, about = "Pull-based fleet manager for NixOS")]
pub struct Cli {
    /// The fleet repo, for the commands that read one (default: the current directory or
    /// the nearest parent with bento.toml)
    #[arg(
        id = "top_fleet",
        long = "fleet",
        env = "BENTO_FLEET",
        value_name = "DIR"
    )]
    pub fleet: Option<PathBuf>,

    /// More log output (-v: debug, -vv: trace); BENTO_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only results and errors: no progress, notes or informational log lines
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,

    /// The command was given `--json` (set by [`parse`]): its errors are printed as
    /// a JSON document too.
    #[arg(skip)]
    pub json: bool,
}

/// `--json` on the innermost subcommand of `matches`.
pub fn wants_json(matches: &clap::ArgMatches) -> bool {
    let mut m = matches;
    while let Some((_, sub)) = m.subcommand() {
        m = sub;
    }
    matches!(m.try_get_one::<bool>("json"), Ok(Some(&true)))
}

// `--fleet DIR` of a command that reads a fleet (after the command, or before it). Plain
// comments on these structs: clap would take doc comments for the commands' about text.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FleetArg {
    /// The fleet repo (default: the current directory or the nearest parent with bento.toml)
    #[arg(long, global = true, value_name = "DIR")]
    pub fleet: Option<PathBuf>,
}

// A command that reads a fleet: its own arguments and `--fleet`.
#[derive(Debug, clap::Args)]
pub struct OnFleet<A: clap::Args> {
    #[command(flatten)]
    pub fleet: FleetArg,
    #[command(flatten)]
    pub args: A,
}

// A command group whose every subcommand reads a fleet.
#[derive(Debug, clap::Args)]
pub struct OnFleetGroup<C: Subcommand> {
    #[command(flatten)]
    pub fleet: FleetArg,
    #[command(subcommand)]
    pub command: C,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new fleet repo with one example host
    Init(init::Args),
    /// Create the fleet's signing key (ed25519, OpenSSH format), or with --cache the Nix
    /// binary-cache key
    Keygen(keygen::Args),
    /// Publish every host's configuration into its SFTP chroot
    Publish(OnFleet<publish::Args>),
    /// Build every host's system on this server and record what each host should run
    Build(OnFleet<build::Args>),
    /// Show the state of every host: up to date, pending, failing, rolled back, silent…
    Status(OnFleet<status::Args>),
    /// Show a host's past runs, or one run's full log
    Log(OnFleet<log::Args>),
    /// Show what will change on each host: its running system against the expected one
    Diff(OnFleet<diff::Args>),
    /// Update the lock files of every flake directory in the fleet
    FlakeUpdate(OnFleet<flake_update::Args>),
    /// Publish wave by wave ([rollout] waves), halting at the first failing host
    Rollout(OnFleet<rollout::Args>),
    /// Start the selected hosts' agent runs now (ssh, or [server] trigger_command)
    Trigger(OnFleet<trigger::Args>),
    /// Make a kept earlier version live again on hosts, as a new version
    Rollback(OnFleet<rollback::Args>),
    /// Every publish, rollback, rollout step and hold, oldest first (the audit trail)
    Journal(OnFleet<journal::Args>),
    /// A host's kept versions: serial, digest, created, commit, what happened to each
    Versions(OnFleet<versions::Args>),
    /// Encrypted secrets in the fleet repo: edit, show, rekey
    Secret(OnFleetGroup<secret::Command>),
    /// Set up and check the SFTP server (accounts, sshd, NixOS module)
    Server(OnFleetGroup<server::Command>),
    /// Enrol hosts in the fleet: `bento host add NAME --key PUBKEY`
    Host(OnFleetGroup<host::Command>),
    /// Print a host's agent settings (agent.toml and known_hosts line, or a NixOS block)
    AgentConfig(OnFleet<agent_config::Args>),
    /// The machine-side agent (runs on each NixOS host)
    #[command(subcommand)]
    Agent(agent::Command),
    /// Print shell completions (bash, zsh, fish, …) for bento
    Completions(completions::Args),
    /// Print bento's man page (generated from these definitions)
    Man(completions::ManArgs),
    /// List completion candidates (host names, @tags) for the shell scripts
    #[command(hide = true)]
    Complete(completions::CompleteArgs),
}

/// Exit status for errors that stop a command.
pub const EXIT_ERROR: u8 = exit::ERROR;

/// The command line as parsed, with each command's EXIT STATUS section in its `--help`.
/// Parses the command line (with the EXIT STATUS sections in `--help`), and notes whether
/// the chosen command (at any depth) was given `--json`, whichever command that is: one rule
/// at the edge, not one per command.
pub fn parse() -> Cli {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let matches = exit::annotate(Cli::command()).get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli.json = wants_json(&matches);
    cli
}

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
    // `bento publish --fleet DIR` over `bento --fleet DIR publish` over BENTO_FLEET.
    let top = cli.fleet;
    let json = cli.json;
    let fleet = |f: FleetArg| f.fleet.or(top.clone());
    let result = match cli.command {
        Command::Init(args) => init::run(args),
        Command::Keygen(args) => keygen::run(args),
        Command::Publish(c) if c.args.dry_run => dry_run::run(fleet(c.fleet), c.args),
        Command::Publish(c) => publish::run(fleet(c.fleet), c.args),
        Command::Build(c) => build::run(fleet(c.fleet), c.args),
        Command::Status(c) => status::run(fleet(c.fleet), c.args),
        Command::Log(c) => log::run(fleet(c.fleet), c.args),
        Command::Diff(c) => diff::run(fleet(c.fleet), c.args),
        Command::FlakeUpdate(c) => flake_update::run(fleet(c.fleet), c.args),
        Command::Rollout(c) => rollout::run(fleet(c.fleet), c.args),
        Command::Trigger(c) => trigger::run(fleet(c.fleet), c.args),
        Command::Rollback(c) => rollback::run(fleet(c.fleet), c.args),
        Command::Journal(c) => journal::run(fleet(c.fleet), c.args),
        Command::Versions(c) => versions::run(fleet(c.fleet), c.args),
        Command::Secret(c) => secret::run(fleet(c.fleet), c.command),
        Command::Server(c) => server::run(fleet(c.fleet), c.command),
        Command::Host(c) => host::run(fleet(c.fleet), c.command),
        Command::AgentConfig(c) => agent_config::run(fleet(c.fleet), c.args),
        Command::Agent(cmd) => agent::run(cmd),
        Command::Completions(args) => completions::run(args),
        Command::Man(args) => completions::man(args),
        Command::Complete(args) => completions::complete(top.clone(), args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            let text = error_text(&err);
            eprintln!("error: {text}");
            // A script that asked for JSON gets one document on every outcome: the error
            // as one, unless the command printed its own before failing.
            if json && !crate::sys::output::json_printed() {
                let _ = crate::sys::output::json(&error_document(&text));
            }
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// What `--json` prints for an error that stopped a command (docs/reference.md).
pub fn error_document(text: &str) -> serde_json::Value {
    serde_json::json!({ "result": "error", "error": text })
}

/// An error and its causes on one line, `outer: cause: cause`, leaving out a cause whose
/// text is already there: many errors include their source in their own message
/// (`{path}: {source}`), and printing it again says the same thing twice.
pub fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        let part = part.trim();
        if part.is_empty() || text.contains(part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(part);
    }
    text
}

/// Loads the fleet named by `--fleet`/`BENTO_FLEET`, or found from the current directory.
pub fn load_fleet(fleet: Option<PathBuf>) -> anyhow::Result<Fleet> {
    let start = match fleet {
        Some(dir) => dir,
        None => std::env::current_dir()?,
    };
    Ok(Fleet::find(&start)?)
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct WithSource {
        path: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let shown = io.to_string();
        let err = anyhow::Error::new(WithSource {
            path: "/etc/bento/agent.toml",
            source: io,
        })
        .context("loading the agent's settings");
        assert_eq!(
            error_text(&err),
            format!("loading the agent's settings: /etc/bento/agent.toml: {shown}")
        );
        assert_eq!(error_text(&err).matches(&shown).count(), 1);
        // Causes that add something are all kept, in order.
        let err = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(error_text(&err), "outer: middle: inner");
    }
}
