//! `bento build`: build every host's system on this server (in parallel), record what each
//! host should run, and with `--switch` apply one host's build to this machine.

use std::collections::HashMap;
use std::io::{BufRead as _, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::Context as _;

use crate::nix::Nix;
use crate::protocol::layout::Chroot;
use crate::server::build::{self, HostBuild, Outcome};
use crate::server::fleet::{Fleet, HostName, NixFlakeHosts};
use crate::server::snapshot::{HashCache, Scanner};
use crate::sys::output;

/// The system profile `--switch` sets, as `nixos-rebuild` does.
pub const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build only this host (repeatable)
    #[arg(long = "host", value_name = "NAME", value_parser = super::publish::parse_host)]
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
    let chroot = chroot_of(&fleet, args.chroot.clone())?;
    // rollout (#13): --on adds the hosts it selects (cli/select.rs).
    args.hosts = super::select::defined(&fleet, &chroot, &args.hosts, &args.on.on)?;
    let jobs = args.jobs.map(usize::from).unwrap_or_else(default_jobs);
    let results = build_hosts(&fleet, &chroot, &args.hosts, args.dry, jobs, !args.json)?;
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
    if failed > 0 {
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

pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

pub fn chroot_of(fleet: &Fleet, chroot: Option<PathBuf>) -> anyhow::Result<Chroot> {
    let root = chroot.unwrap_or_else(|| fleet.config.server.chroot.clone());
    let root = std::path::absolute(&root).with_context(|| format!("chroot {}", root.display()))?;
    Ok(Chroot::new(root))
}

/// Builds hosts with progress (a spinner per running build on a terminal) and, with
/// `lines`, one result line per host on stdout as each finishes. Shared with
/// `publish --build`.
pub fn build_hosts(
    fleet: &Fleet,
    chroot: &Chroot,
    only: &[HostName],
    dry: bool,
    jobs: usize,
    lines: bool,
) -> anyhow::Result<Vec<HostBuild>> {
    let now = SystemTime::now();
    // The hash cache is only read: publish owns writing it, under its lock.
    let scanner = Scanner::new(
        fleet.root.clone(),
        HashCache::load(&chroot.hash_cache_path()),
        now,
    );
    let flakes = NixFlakeHosts::new(Nix::default(), Some(chroot.flake_cache_path()));
    let terminal = std::io::stderr().is_terminal();
    let multi = indicatif::MultiProgress::new();
    if !terminal {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let bars: Mutex<HashMap<HostName, indicatif::ProgressBar>> = Mutex::default();
    let width = 12;
    let on_start = |host: &HostName| {
        let bar = multi.add(indicatif::ProgressBar::new_spinner());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .expect("valid template"),
        );
        bar.set_message(format!(
            "{} {host}",
            if dry { "evaluating" } else { "building" }
        ));
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bars.lock().expect("lock").insert(host.clone(), bar);
    };
    let on_done = |r: &HostBuild| {
        if let Some(bar) = bars.lock().expect("lock").remove(&r.host) {
            bar.finish_and_clear();
            multi.remove(&bar);
        }
        if lines {
            multi.suspend(|| output::line(&format_line(r, width)));
        }
    };
    let results = build::run(
        fleet,
        &flakes,
        &scanner,
        &Nix::default(),
        &build::Options {
            chroot: chroot.clone(),
            only: only.to_vec(),
            dry,
            jobs,
            now,
            on_start: &on_start,
            on_done: &on_done,
        },
    )
    .with_context(|| format!("building {}", fleet.root.display()))?;
    Ok(results)
}

/// `alpha  built  /nix/store/…`, or `alpha  failed  error: …` followed by the log tail.
pub fn format_line(r: &HostBuild, width: usize) -> String {
    let host = r.host.as_str();
    match r.outcome {
        Outcome::Built | Outcome::Evaluated => {
            let word = if r.outcome == Outcome::Built {
                "built"
            } else {
                "evaluated"
            };
            let system = r.system.as_ref().map_or("-", |s| s.as_str());
            match &r.drv {
                Some(drv) => format!("{host:width$}  {word:9}  {system}  ({drv})"),
                None => format!("{host:width$}  {word:9}  {system}"),
            }
        }
        Outcome::Failed => {
            let mut text = format!(
                "{host:width$}  {:9}  {}",
                "failed",
                r.error.as_deref().unwrap_or("failed")
            );
            for l in r.log_tail.iter().flat_map(|t| t.lines()) {
                text.push_str("\n    ");
                text.push_str(l);
            }
            text
        }
    }
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
