//! `bento build`: build every host's system on this server (in parallel), record what each
//! host should run, and with `--switch` apply one host's build to this machine.

use std::io::{BufRead as _, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::nix::Nix;
use crate::server::build::{self, Outcome};
use crate::server::fleet::HostName;
use crate::sys::output;

/// The system profile `--switch` sets, as `nixos-rebuild` does.
pub const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build only this host (repeatable)
    #[arg(long = "host", value_name = "NAME", value_parser = super::select::parse_host)]
    hosts: Vec<HostName>,
    // rollout (#13): --on selectors (cli/select.rs).
    #[command(flatten)]
    on: super::select::OnArgs,
    /// Evaluate to derivations only; record the derivation and the path it will build
    #[arg(long, conflicts_with = "switch")]
    dry: bool,
    /// Builds at once (default: the number of cores)
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    jobs: Option<u16>,
    /// The chroot root whose state records the builds (default: [server] chroot in bento.toml)
    #[arg(long, value_name = "DIR")]
    chroot: Option<PathBuf>,
    /// Print a JSON array of results on stdout
    #[arg(long)]
    json: bool,
    /// Apply the build to this machine (needs exactly one --host)
    #[arg(long)]
    switch: bool,
    /// With --switch: do not ask for confirmation
    #[arg(long, short = 'y', requires = "switch")]
    yes: bool,
    /// With --switch: the system profile to set
    #[arg(long, value_name = "PATH", default_value = SYSTEM_PROFILE, requires = "switch")]
    profile: PathBuf,
}

pub fn run(fleet: Option<PathBuf>, mut args: Args) -> anyhow::Result<ExitCode> {
    if args.switch && args.hosts.len() != 1 {
        anyhow::bail!(
            "--switch applies one host's system to this machine: name it with exactly one --host"
        );
    }
    let fleet = super::load_fleet(fleet)?;
    let chroot = super::select::chroot_of(&fleet, args.chroot.clone())?;
    // A flake directory that cannot list its hosts fails the run when every host was asked for.
    let everything = args.hosts.is_empty() && args.on.on.is_empty();
    // rollout (#13): --on adds the hosts it selects (cli/select.rs).
    args.hosts = super::select::defined(&fleet, &chroot, &args.hosts, &args.on.on)?;
    let jobs = args
        .jobs
        .map(usize::from)
        .unwrap_or_else(super::select::default_jobs);
    let (results, broken) = super::builds::build_hosts(
        &fleet,
        &chroot,
        &args.hosts,
        args.dry,
        jobs,
        !args.json,
        everything,
    )?;
    if args.json {
        output::json(&results)?;
    }
    let failed = results
        .iter()
        .filter(|r| r.outcome == Outcome::Failed)
        .count();
    tracing::info!(
        "{} built, {} evaluated, {failed} failed",
        results
            .iter()
            .filter(|r| r.outcome == Outcome::Built)
            .count(),
        results
            .iter()
            .filter(|r| r.outcome == Outcome::Evaluated)
            .count(),
    );
    if failed > 0 || (everything && broken > 0) {
        return Ok(ExitCode::from(super::EXIT_ERROR));
    }
    if args.switch {
        let built = &results[0];
        let system = built.system.as_ref().context("the build gave no system")?;
        if !args.yes
            && !confirm(&format!(
                "Switch this machine to {} ({system}) through {}?",
                built.host,
                args.profile.display()
            ))?
        {
            anyhow::bail!("not switched");
        }
        build::switch(&Nix::default(), &args.profile, system)
            .with_context(|| format!("switching to {system}"))?;
        output::note(&format!("switched to {system}"));
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks on the terminal; refuses to guess when there is none.
fn confirm(question: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{question} Not asking without a terminal: pass --yes to switch");
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
