//! `bento rollout`: publish the working tree wave by wave (`[rollout] waves` or `--waves`),
//! waiting after each wave until every host of it reported on the new version. The first
//! failure, rollback or silent host halts it; `--resume` continues at the wave it stopped
//! at; `--status` shows where it stands. The plan (waves and hosts) is printed before the
//! first publish; a wave's hosts are judged only on reports newer than its publish, and a
//! host its trigger could not start halts the wave at once. Progress lives in
//! `<chroot>/.bento/rollout.json` (`server::rollout`).

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
    /// Show where the last rollout stands (its waves, hosts, phase and why it halted) and exit
    #[arg(long, conflicts_with_all = ["resume", "waves", "on", "trigger"])]
    status: bool,
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
    if args.status {
        return show_status(&chroot, args.json);
    }
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

    let previous = match rollout::load(&chroot) {
        // A new rollout replaces whatever was there, so a broken file cannot block it.
        Err(rollout::RolloutError::Corrupt { path, message }) if !args.resume => {
            output::warning(&format!(
                "replacing {}: not a rollout's progress ({message})",
                path.display()
            ));
            None
        }
        other => other?,
    };
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

    print_plan(&progress);
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

/// Each wave with its hosts, before anything is published (stderr: results stay on stdout).
fn print_plan(progress: &Progress) {
    let n = progress.waves.len();
    for line in plan_lines(progress) {
        output::note(&format!("plan: {line}"));
    }
    if n == 0 {
        output::note("plan: no waves");
    }
}

/// `wave 1/3 (@canary): alpha, beta`, one line per wave.
fn plan_lines(progress: &Progress) -> Vec<String> {
    let n = progress.waves.len();
    progress
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let hosts = if w.hosts.is_empty() {
                "no new hosts".to_owned()
            } else {
                super::wait::names(&w.hosts)
            };
            format!("wave {}/{n} ({}): {hosts}", i + 1, w.selector)
        })
        .collect()
}

/// `bento rollout --status`: the last rollout's progress, read-only (no lock taken).
fn show_status(chroot: &Chroot, json: bool) -> anyhow::Result<ExitCode> {
    let Some(progress) = rollout::load(chroot)? else {
        if json {
            output::json(&serde_json::json!({ "phase": null }))?;
        } else {
            output::line(&format!("no rollout has run in {}", chroot.root.display()));
        }
        return Ok(ExitCode::SUCCESS);
    };
    if json {
        output::json(&progress)?;
        return Ok(ExitCode::SUCCESS);
    }
    let n = progress.waves.len();
    let stands = match progress.phase {
        Phase::Done => format!("done ({n} waves)"),
        Phase::Halted => format!(
            "halted at wave {}/{n}: {}; fix it and run `bento rollout --resume`",
            progress.wave + 1,
            progress.halt.as_ref().map_or("-", |h| h.reason.as_str())
        ),
        Phase::Running => format!(
            "at wave {}/{n} (running, or interrupted: `bento rollout --resume` continues it)",
            progress.wave + 1
        ),
    };
    output::line(&format!("rollout started {}: {stands}", progress.started));
    for (i, line) in plan_lines(&progress).into_iter().enumerate() {
        let mark = match (i.cmp(&progress.wave), progress.phase) {
            (_, Phase::Done) | (std::cmp::Ordering::Less, _) => "done",
            (std::cmp::Ordering::Equal, Phase::Halted) => "halted",
            (std::cmp::Ordering::Equal, _) => "current",
            (std::cmp::Ordering::Greater, _) => "waiting",
        };
        output::line(&format!("  {mark:8} {line}"));
    }
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
    // Read before publishing: a report the host writes after the publish is never taken
    // for an old one, and the wave judges its hosts only on reports newer than these.
    let baselines = super::wait::baselines(fleet, chroot, &hosts)?;
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
    let mut tracker = Tracker::new(baselines, true);
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
        let triggered = super::trigger::trigger_lines(
            &template,
            &targets,
            false,
            16,
            Duration::from_secs(120),
            false,
        )?;
        // A host that could not be started will not report: stop now, with the trigger's
        // own error, rather than at --wait-timeout.
        let missed: Vec<&crate::server::trigger::Triggered> = triggered
            .iter()
            .filter(|t| t.outcome != crate::server::trigger::Outcome::Started)
            .collect();
        if !missed.is_empty() {
            let reason = missed
                .iter()
                .map(|t| {
                    format!(
                        "triggering {} failed: {}",
                        t.host,
                        t.error.as_deref().unwrap_or("no error text")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Ok(WaveEnd::Halted(
                Halt {
                    reason,
                    hosts: missed.iter().map(|t| t.host.clone()).collect(),
                },
                Vec::new(),
            ));
        }
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
            serial_floor: None,
            action: "rollout step",
            release: &[],
            dry_run: false,
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
