//! `bento trigger`: start the selected hosts' agent runs now (in parallel, bounded, with
//! timeouts), optionally as retries, and with `--wait` follow them to their outcome.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use crate::server::fleet::HostName;
use crate::server::trigger::{self, Outcome, Triggered};
use crate::server::wait::{Finished, Tracker};
use crate::sys::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this host (repeatable)
    #[arg(long = "host", value_name = "NAME", value_parser = super::select::parse_host)]
    hosts: Vec<HostName>,
    #[command(flatten)]
    on: super::select::OnArgs,
    /// Start a run that also retries a version the host backed off from or rolled back
    #[arg(long)]
    retry: bool,
    /// Then follow each triggered host until it reported on its newest version
    #[arg(long, value_name = "TIMEOUT", num_args = 0..=1, require_equals = true,
          default_missing_value = super::wait::DEFAULT_TIMEOUT, value_parser = super::wait::parse_timeout)]
    wait: Option<Duration>,
    /// Trigger commands at once
    #[arg(long, short = 'j', value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    jobs: u16,
    /// Give up on a host's trigger command after this long (it is then listed as unreachable)
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = super::wait::parse_timeout)]
    timeout: Duration,
    /// Print a JSON summary on stdout at the end
    #[arg(long)]
    json: bool,
    /// The chroot root (default: [server] chroot in bento.toml, else /srv/bento)
    #[arg(long, value_name = "DIR")]
    chroot: Option<PathBuf>,
}

#[derive(Serialize)]
struct Summary<'a> {
    triggered: &'a [Triggered],
    #[serde(skip_serializing_if = "Option::is_none")]
    hosts: Option<&'a [Finished]>,
}

pub fn run(fleet: Option<PathBuf>, args: Args) -> anyhow::Result<ExitCode> {
    let fleet = super::load_fleet(fleet)?;
    let chroot = super::select::chroot_of(&fleet, args.chroot.clone())?;
    let known = crate::server::targets::known_hosts(&fleet.config, &chroot.root)
        .with_context(|| format!("listing hosts in {}", chroot.root.display()))?;
    let mut hosts = super::select::combine(&fleet, &args.hosts, &args.on.on, &known)?;
    if hosts.is_empty() {
        hosts = known.clone();
    }
    if let Some(h) = hosts.iter().find(|h| !known.contains(h)) {
        anyhow::bail!("no host named {h}: not in bento.toml and nothing published for it");
    }
    if hosts.is_empty() {
        anyhow::bail!("no hosts: bento.toml names none and nothing is published");
    }
    let template = fleet
        .config
        .server
        .trigger_command
        .clone()
        .unwrap_or_else(trigger::default_command);
    let targets = trigger::targets(&fleet.config, &hosts)?;
    let baselines = super::wait::baselines(&fleet, &chroot, &hosts)?;
    let results = trigger_lines(
        &template,
        &targets,
        args.retry,
        args.jobs.into(),
        args.timeout,
        !args.json,
    )?;
    let started: Vec<HostName> = results
        .iter()
        .filter(|r| r.outcome == Outcome::Started)
        .map(|r| r.host.clone())
        .collect();
    let all_started = started.len() == results.len();

    let mut finished = None;
    if let Some(timeout) = args.wait {
        let mut tracker = Tracker::new(
            baselines
                .into_iter()
                .filter(|(h, _)| started.contains(h))
                .collect(),
            args.retry,
        );
        super::wait::follow(&fleet, &chroot, &mut tracker, timeout, false, !args.json)?;
        super::wait::summary(&tracker.finished);
        finished = Some(tracker.finished);
    }
    if args.json {
        output::json(&Summary {
            triggered: &results,
            hosts: finished.as_deref(),
        })?;
    }
    let ok = all_started && finished.as_deref().is_none_or(super::wait::all_succeeded);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_ERROR)
    })
}

/// Runs the trigger commands, printing one line per host as each ends (unless `lines` is
/// false), and the hosts that could not be triggered on stderr.
pub fn trigger_lines(
    template: &[String],
    targets: &[trigger::Target],
    retry: bool,
    jobs: usize,
    timeout: Duration,
    lines: bool,
) -> anyhow::Result<Vec<Triggered>> {
    let width = targets
        .iter()
        .map(|t| t.host.as_str().len())
        .max()
        .unwrap_or(0);
    let bar = output::progress(targets.len() as u64, "triggering");
    let on_done = |t: &Triggered| {
        bar.inc(1);
        if lines {
            let word = match t.outcome {
                Outcome::Started => "started",
                Outcome::Unreachable => "unreachable",
                Outcome::Failed => "failed",
            };
            let line = format!(
                "{:width$}  {word:11}  {}",
                t.host.as_str(),
                t.error.as_deref().unwrap_or("")
            );
            bar.suspend(|| output::line(line.trim_end()));
        }
    };
    let results = trigger::run_all(template, targets, retry, jobs, timeout, &on_done)?;
    bar.finish_and_clear();
    let missed: Vec<&HostName> = results
        .iter()
        .filter(|r| r.outcome != Outcome::Started)
        .map(|r| &r.host)
        .collect();
    if !missed.is_empty() {
        output::note(&format!("not triggered: {}", super::wait::names(missed)));
    }
    Ok(results)
}
