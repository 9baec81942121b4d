//! `bento rollout`: publish the working tree wave by wave (`[rollout] waves` or `--waves`),
//! waiting after each wave until every host of it reported on the new version. The first
//! failure, rollback or silent host halts it; `--resume` continues at the wave it stopped
//! at. Progress lives in `<chroot>/.bento/rollout.json` (`server::rollout`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde::Serialize;

use crate::protocol::layout::Chroot;
use crate::server::fleet::{Fleet, HostName};
use crate::server::publish::{self, HostReport, Status};
use crate::server::rollout::{self, Halt, Phase, Progress};
use crate::server::select::Selector;
use crate::server::wait::{Finished, Tracker};
use crate::sys::atomic;
use crate::sys::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    on: super::select::OnArgs,
    /// The waves, comma-separated (default: [rollout] waves in bento.toml), e.g. @canary,25%,100%
    #[arg(
        long,
        value_name = "SELECTORS",
        value_delimiter = ',',
        conflicts_with = "resume"
    )]
    waves: Vec<Selector>,
    /// Halt when a wave's hosts have not all reported on the new version after this long
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = super::wait::parse_timeout)]
    wait_timeout: Duration,
    /// Continue the halted or interrupted rollout at the wave it stopped at
    #[arg(long, conflicts_with = "on")]
    resume: bool,
    /// After publishing a wave, start its hosts' runs with the trigger command (as `bento trigger`)
    #[arg(long)]
    trigger: bool,
    /// Print a JSON summary on stdout at the end
    #[arg(long)]
    json: bool,
    /// The chroot root (default: [server] chroot in bento.toml, else /srv/bento)
    #[arg(long, value_name = "DIR")]
    chroot: Option<PathBuf>,
}

#[derive(Serialize)]
struct Summary<'a> {
    #[serde(flatten)]
    progress: &'a Progress,
    hosts: &'a [Finished],
}

pub fn run(fleet: Option<PathBuf>, args: Args) -> anyhow::Result<ExitCode> {
    let fleet = super::load_fleet(fleet)?;
    let chroot = super::select::chroot_of(&fleet, args.chroot.clone())?;
    // Creates the chroot and .bento/ as publish would; its lock is not kept (each wave
    // takes it while it publishes).
    drop(publish::open_store(
        &*super::select::store_of(&fleet, &chroot)?,
        || {},
    )?);
    let lock_path = rollout::lock_path(&chroot);
    let _lock = atomic::Lock::try_acquire(&lock_path)
        .with_context(|| format!("locking {}", lock_path.display()))?
        .with_context(|| {
            format!(
                "another `bento rollout` is running (it holds {})",
                lock_path.display()
            )
        })?;

    let previous = rollout::load(&chroot)?;
    let mut progress = if args.resume {
        match previous {
            Some(p) if p.phase != Phase::Done => {
                output::note(&format!(
                    "resuming the rollout started {} at wave {}/{} ({})",
                    p.started,
                    p.wave + 1,
                    p.waves.len(),
                    p.waves[p.wave].selector
                ));
                p
            }
            _ => anyhow::bail!(
                "no halted or interrupted rollout to resume in {}",
                rollout::state_path(&chroot).display()
            ),
        }
    } else {
        if let Some(p) = previous.filter(|p| p.phase != Phase::Done) {
            output::note(&format!(
                "replacing the unfinished rollout started {} (it stopped at wave {}/{})",
                p.started,
                p.wave + 1,
                p.waves.len()
            ));
        }
        start(&fleet, &chroot, &args)?
    };

    let mut finished = Vec::new();
    let n = progress.waves.len();
    while progress.wave < n {
        let k = progress.wave;
        progress.phase = Phase::Running;
        progress.halt = None;
        rollout::save(&chroot, &progress)?;
        let wave = &progress.waves[k];
        output::note(&format!(
            "wave {}/{n} ({}): {}",
            k + 1,
            wave.selector,
            if wave.hosts.is_empty() {
                "no new hosts".to_owned()
            } else {
                super::wait::names(&wave.hosts)
            }
        ));
        match run_wave(&fleet, &chroot, &progress, k, &args)? {
            WaveEnd::Done(mut f) => {
                finished.append(&mut f);
                progress.wave += 1;
            }
            WaveEnd::Halted(halt, mut f) => {
                finished.append(&mut f);
                output::note(&format!(
                    "rollout halted at wave {}/{n}: {}; later waves keep what they run; fix it and run `bento rollout --resume`",
                    k + 1,
                    halt.reason
                ));
                progress.phase = Phase::Halted;
                progress.halt = Some(halt);
                rollout::save(&chroot, &progress)?;
                print_summary(&progress, &finished, args.json)?;
                return Ok(ExitCode::from(super::EXIT_ERROR));
            }
        }
    }
    progress.phase = Phase::Done;
    rollout::save(&chroot, &progress)?;
    tracing::info!("rollout done: {n} waves");
    print_summary(&progress, &finished, args.json)?;
    Ok(ExitCode::SUCCESS)
}

fn print_summary(progress: &Progress, finished: &[Finished], json: bool) -> anyhow::Result<()> {
    if json {
        output::json(&Summary {
            progress,
            hosts: finished,
        })?;
    }
    Ok(())
}

/// Plans a new rollout over the selected, not held, hosts.
fn start(fleet: &Fleet, chroot: &Chroot, args: &Args) -> anyhow::Result<Progress> {
    let defined = super::select::discovered(fleet, chroot)?;
    let mut universe = super::select::combine(fleet, &[], &args.on.on, &defined)?;
    if universe.is_empty() {
        universe = defined;
    }
    let held = crate::server::targets::held(&fleet.config);
    universe.retain(|h| {
        let keep = !held.contains(h);
        if !keep {
            output::note(&format!(
                "not rolling out to {h}: hold = true under [hosts.{h}] in bento.toml"
            ));
        }
        keep
    });
    let waves = if args.waves.is_empty() {
        fleet.config.rollout.waves.clone().unwrap_or_default()
    } else {
        args.waves.clone()
    };
    let planned = rollout::plan(
        &waves,
        &universe,
        &crate::server::targets::tags(&fleet.config),
    )
    .with_context(|| format!("planning the rollout of {}", fleet.root.display()))?;
    let started = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    Ok(Progress::new(started, planned))
}

enum WaveEnd {
    Done(Vec<Finished>),
    Halted(Halt, Vec<Finished>),
}

/// Publishes waves `0..=k`, optionally triggers them, and follows them.
fn run_wave(
    fleet: &Fleet,
    chroot: &Chroot,
    progress: &Progress,
    k: usize,
    args: &Args,
) -> anyhow::Result<WaveEnd> {
    let held = crate::server::targets::held(&fleet.config);
    let hosts: Vec<HostName> = progress
        .through(k)
        .into_iter()
        .filter(|h| !held.contains(h))
        .collect();
    if hosts.is_empty() {
        return Ok(WaveEnd::Done(Vec::new()));
    }
    let reports = publish_hosts(fleet, chroot, &hosts, !args.json)?;
    let failed: Vec<HostName> = reports
        .iter()
        .filter(|r| r.status == Status::Failed)
        .map(|r| r.host.clone())
        .collect();
    if !failed.is_empty() {
        let reason = format!("publishing {} failed", super::wait::names(&failed));
        return Ok(WaveEnd::Halted(
            Halt {
                reason,
                hosts: failed,
            },
            Vec::new(),
        ));
    }
    let mut tracker = Tracker::new(super::wait::baselines(fleet, chroot, &hosts)?, false);
    if args.trigger {
        // Only hosts not already on the new version need a run.
        let interval = |h: &HostName| fleet.config.interval(h);
        let store = super::select::store_of(fleet, chroot)?;
        crate::server::wait::poll_once(
            &mut tracker,
            &crate::server::wait::Follow {
                store: &*store,
                chroot,
                interval: &interval,
                timeout: Duration::ZERO,
                poll: Duration::ZERO,
                stop_on_failure: false,
            },
            &mut |_, _| {},
        );
        let template = fleet
            .config
            .server
            .trigger_command
            .clone()
            .unwrap_or_else(crate::server::trigger::default_command);
        let targets = crate::server::trigger::targets(&fleet.config, &tracker.pending())?;
        super::trigger::trigger_lines(
            &template,
            &targets,
            false,
            16,
            Duration::from_secs(120),
            false,
        )?;
    }
    super::wait::follow(
        fleet,
        chroot,
        &mut tracker,
        args.wait_timeout,
        true,
        !args.json,
    )?;
    let bad: Vec<HostName> = tracker
        .finished
        .iter()
        .filter(|f| f.outcome != crate::server::wait::Outcome::Success)
        .map(|f| f.host.clone())
        .collect();
    if bad.is_empty() && tracker.is_done() {
        return Ok(WaveEnd::Done(tracker.finished));
    }
    let reason = tracker
        .finished
        .iter()
        .filter(|f| f.outcome != crate::server::wait::Outcome::Success)
        .map(|f| {
            format!(
                "{} {}{}",
                f.host,
                f.outcome.word(),
                f.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    Ok(WaveEnd::Halted(
        Halt { reason, hosts: bad },
        tracker.finished,
    ))
}

/// Publishes the working tree for `hosts`, as `bento publish --host …` does.
fn publish_hosts(
    fleet: &Fleet,
    chroot: &Chroot,
    hosts: &[HostName],
    lines: bool,
) -> anyhow::Result<Vec<HostReport>> {
    let published = super::publish::publish_tree(
        fleet,
        chroot,
        super::publish::Tree {
            only: hosts.to_vec(),
            systems: Default::default(),
            eval: true,
            jobs: super::select::default_jobs(),
            on_host: &|_| {},
        },
    )?;
    for b in &published.broken {
        output::warning(&format!("{b}; none of its hosts is published"));
    }
    super::publish::print_warnings(&published.reports);
    let reports = published.reports;
    if lines {
        let width = reports
            .iter()
            .map(|r| r.host.as_str().len())
            .max()
            .unwrap_or(0);
        for r in &reports {
            eprintln!("{}", super::publish::format_line(r, width));
        }
    }
    Ok(reports)
}
