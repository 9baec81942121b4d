//! One run of `bento agent update`: lock, pick the source to follow (`choose`: `server`,
//! else the mirrors; it reads `current` and checks that the live manifest is this host's),
//! deliver what the spool holds, decide (`decide`), then apply (`apply`, `self_update`) and
//! record (`record`).
//!
//! Invariant: errors returned from [`update`] stop the run before a version is attempted
//! (nothing on the machine changed, no report); every attempt ends in a report.

use super::apply::Attempt;
use super::config::snapshot_settings;
use super::config::AgentConfig;
use super::decide::{self, Decision, Facts};
use super::outcome::{secs, state_err, AgentError, RunResult, UpdateOptions};
use super::record::{no_op, Run};
use super::source::RemoteError;
use super::state::StateDir;
use super::{choose, record, self_update};
use crate::protocol::report::RunKind;
use crate::sys::atomic::Lock;

/// One update run.
pub fn update(opts: &UpdateOptions<'_>) -> Result<RunResult, AgentError> {
    let cfg = opts.config;
    let dirs = StateDir::new(&cfg.state_dir);
    dirs.create().map_err(state_err(&dirs.root))?;
    let _lock = Lock::acquire(&dirs.lock(), opts.on_wait).map_err(state_err(&dirs.lock()))?;
    dirs.remove_leftovers();
    // On every run, not only when a version is applied: a fleet without signatures must
    // not look the same as one with them in the agent's journal.
    if cfg.trusted_keys.is_empty() {
        tracing::warn!("{UNSIGNED_WARNING}");
    }
    let result = update_locked(opts, &dirs);
    if let Err(AgentError::Remote(e)) = &result {
        record_unreachable(&dirs, e, secs((opts.now)()));
    }
    result
}

/// What the journal says on every run of an agent without `trusted_keys`.
const UNSIGNED_WARNING: &str = "no trusted_keys configured: manifest signatures are not verified, so anyone who can write this host's chroot on the server can change this machine (see `bento keygen`)";

/// The longest error kept for a run that could not reach the server.
const MAX_UNREACHABLE_CHARS: usize = 1000;

/// Keeps a run that could not reach the server in the state, so `bento agent status` says
/// so instead of showing the last success. Reads the state afresh: the run may have saved it.
fn record_unreachable(dirs: &StateDir, error: &RemoteError, now: u64) {
    let recorded = dirs.load().and_then(|mut state| {
        // Bounded: ssh's stderr can be long, and the state is read on every run.
        let text = error.to_string();
        let text = crate::sys::terminal::truncate(&text, MAX_UNREACHABLE_CHARS);
        state.record_unreachable(text.into_owned(), now);
        dirs.save(&state)
    });
    if let Err(e) = recorded {
        tracing::warn!(
            "cannot record the failed connection in {}: {e}",
            dirs.state_file().display()
        );
    }
}

fn update_locked(opts: &UpdateOptions<'_>, dirs: &StateDir) -> Result<RunResult, AgentError> {
    let cfg = opts.config;
    let mut state = dirs.load().map_err(state_err(&dirs.state_file()))?;

    // `server`, else the mirrors: which one the run follows is `choose`'s alone. It also
    // checks, before anything is written anywhere, that the live manifest is this host's.
    let choice = choose::choose(opts, dirs, &state)?;
    let mut conn = choice.conn;
    let (current, prefetched) = (choice.current, choice.prefetched);
    record::deliver_spool(conn.as_mut(), dirs);

    let running = opts.host.running().map_err(AgentError::Running)?;
    match &choice.server_error {
        // A mirror answered; `bento agent status` still says the server did not.
        Some(e) => {
            let text = e.to_string();
            let text = crate::sys::terminal::truncate(&text, MAX_UNREACHABLE_CHARS);
            state.record_unreachable(text.into_owned(), secs((opts.now)()));
            dirs.save(&state).map_err(state_err(&dirs.state_file()))?;
        }
        // The server answered: the runs that could not reach it are over.
        None if state.unreachable.take().is_some() => {
            dirs.save(&state).map_err(state_err(&dirs.state_file()))?;
        }
        None => {}
    }
    if let Some(reason) = choice.hold {
        return Ok(no_op(opts, conn.as_mut(), &state, running.as_ref(), reason));
    }

    // After a reboot into the applied system, no reboot is pending any more.
    if state.reboot_pending {
        if let (Some(booted), Some(applied)) = (opts.host.booted(), &state.applied) {
            if !opts.host.boot_files_differ(&booted, &applied.system) {
                state.reboot_pending = false;
                dirs.save(&state).map_err(state_err(&dirs.state_file()))?;
            }
        }
    }

    // A source that cannot vouch for its live version changes nothing on this machine
    // (`choose` followed a stale one only when every source it reached was).
    if let Some(verdict) = choice.fresh {
        if let Some(reason) = freshness(opts, dirs, &mut state, verdict)? {
            return Ok(stale(opts, conn.as_mut(), &state, running.as_ref(), reason));
        }
    }

    let facts = Facts {
        state: &state,
        current,
        running: running.as_ref(),
        force: opts.force,
        now: secs((opts.now)()),
        self_update: current.is_some_and(|v| self_update_wanted(cfg, dirs, v)),
    };
    match decide::decide(&facts) {
        Decision::NoOp(reason) => Ok(no_op(opts, conn.as_mut(), &state, running.as_ref(), reason)),
        Decision::SelfUpdate(version) => {
            self_update::self_update(opts, dirs, &mut state, &mut conn, version, running)
        }
        Decision::Apply(version) => {
            let mut run = Run::start(opts, dirs, running.clone(), RunKind::Published);
            run.log.step(&format!(
                "applying version {} (running {})",
                version.short(),
                running.as_ref().map_or("nothing", |r| r.as_str())
            ));
            for note in &choice.notes {
                run.log.step(&format!("note: {note}"));
            }
            run.clock_offset = conn.clock_correction();
            if let Some(offset) = run.clock_offset {
                run.log.step(&clock_note(offset));
            }
            let mut attempt = Attempt {
                cfg,
                dirs,
                host: opts.host,
                version,
                running: running.clone(),
                built: None,
                reboot_required: false,
                created: None,
                applied_created: state.applied.as_ref().and_then(|a| a.created.clone()),
                serial: None,
                applied_serial: state.applied.as_ref().and_then(|a| a.serial),
                settings: None,
                previous: state.applied.as_ref().map(|a| a.version),
                installed: state.installed_files.clone(),
                checks: Vec::new(),
                confirmed: false,
                clock_warning: None,
            };
            let result = attempt.run(&mut conn, prefetched, opts, &mut run.log, &mut run.timings);
            run.finish(opts, &mut state, &mut conn, &attempt, result)
        }
    }
}

/// The chosen source's freshness verdict (`agent::choose` asked it), kept in the state: the
/// reason it is stale, or `None`.
fn freshness(
    opts: &UpdateOptions<'_>,
    dirs: &StateDir,
    state: &mut super::state::State,
    verdict: super::fresh::Verdict,
) -> Result<Option<String>, AgentError> {
    let now = (opts.now)();
    let before = state.clone();
    let stale = match verdict {
        super::fresh::Verdict::Stale(reason) => {
            tracing::warn!("stale: {reason}");
            state.record_stale(reason.clone(), secs(now));
            Some(reason)
        }
        super::fresh::Verdict::Fresh(seen) => {
            state.fresh = Some(seen);
            state.stale = None;
            None
        }
        super::fresh::Verdict::Unchecked => {
            state.stale = None;
            None
        }
    };
    if *state != before {
        dirs.save(state).map_err(state_err(&dirs.state_file()))?;
    }
    Ok(stale)
}

/// A run that found the source stale: the heartbeat says so, nothing else happens.
fn stale(
    opts: &UpdateOptions<'_>,
    sink: &mut dyn super::source::Sink,
    state: &super::state::State,
    running: Option<&crate::protocol::StorePath>,
    reason: String,
) -> RunResult {
    record::heartbeat(sink, opts.config, state, running, (opts.now)());
    RunResult::Stale { reason }
}

/// What the report's log says when the server's clock disagreed with this machine's.
fn clock_note(offset: i64) -> String {
    format!(
        "clock: the server's time is {offset:+} s from this machine's; requests were signed with the server's time (fix this machine's clock)"
    )
}

/// Self-update is enabled (the applied snapshot's settings over agent.toml) for a flake
/// host. Reads the applied tree only; the decision about *when* is `decide`'s.
fn self_update_wanted(
    cfg: &AgentConfig,
    dirs: &StateDir,
    version: crate::protocol::manifest::Digest,
) -> bool {
    let config_dir = dirs.config().join(version.to_hex());
    cfg.effective(snapshot_settings(&config_dir).as_ref())
        .self_update
        && config_dir.join("flake.nix").is_file()
}
