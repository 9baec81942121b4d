//! One run of `bento agent update`: lock, connect, deliver what the spool holds, decide
//! (`decide`), then apply (`apply`, `self_update`) and record (`record`).
//!
//! Invariant: errors returned from [`update`] stop the run before a version is attempted
//! (nothing on the machine changed, no report); every attempt ends in a report.

use std::path::PathBuf;
use std::time::SystemTime;

use super::apply::{snapshot_settings, Attempt};
use super::config::AgentConfig;
use super::decide::{self, Decision, Facts};
use super::host::Host;
use super::record::{heartbeat, secs, state_err, Run};
use super::source::{Connection, RemoteError, Sink};
use super::state::{State, StateDir};
use super::{fetch, record, self_update};
use crate::protocol::layout;
use crate::protocol::report::{Report, RunKind};
use crate::protocol::StorePath;
use crate::sys::atomic::Lock;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("`current` on the server does not hold a digest: {0:?}")]
    BadCurrent(String),
    #[error("cannot tell the running system: {0}")]
    Running(std::io::Error),
}

/// What a run did; each maps to an exit status (docs/agent.md).
#[derive(Debug)]
pub enum RunResult {
    /// Nothing to do (up to date, nothing published, backing off, version rolled back).
    NoOp {
        reason: String,
    },
    Updated(Box<Report>),
    Failed(Box<Report>),
    RolledBack(Box<Report>),
}

impl RunResult {
    pub const EXIT_NOOP: u8 = 0;
    pub const EXIT_UPDATED: u8 = 10;
    pub const EXIT_FAILED: u8 = 11;
    pub const EXIT_ROLLED_BACK: u8 = 12;

    pub fn exit_code(&self) -> u8 {
        match self {
            RunResult::NoOp { .. } => Self::EXIT_NOOP,
            RunResult::Updated(_) => Self::EXIT_UPDATED,
            RunResult::Failed(_) => Self::EXIT_FAILED,
            RunResult::RolledBack(_) => Self::EXIT_ROLLED_BACK,
        }
    }
}

/// Opens a new connection to the server (called again for the confirmation).
pub type Connect<'a> = dyn Fn() -> Result<Box<dyn Connection>, RemoteError> + 'a;

pub struct UpdateOptions<'a> {
    pub config: &'a AgentConfig,
    /// The machine.
    pub host: &'a dyn Host,
    pub connect: &'a Connect<'a>,
    pub now: &'a dyn Fn() -> SystemTime,
    /// Retry a failed or rolled-back version now.
    pub force: bool,
    /// Called when another run holds the lock and this one waits.
    pub on_wait: &'a dyn Fn(),
    /// Progress lines for a person watching (the trigger page, a terminal).
    pub on_progress: &'a dyn Fn(&str),
}

/// One update run.
pub fn update(opts: &UpdateOptions<'_>) -> Result<RunResult, AgentError> {
    let cfg = opts.config;
    let dirs = StateDir::new(&cfg.state_dir);
    dirs.create().map_err(state_err(&dirs.root))?;
    let _lock = Lock::acquire(&dirs.lock(), opts.on_wait).map_err(state_err(&dirs.lock()))?;
    dirs.remove_leftovers();
    let mut state = dirs.load().map_err(state_err(&dirs.state_file()))?;

    let mut conn = (opts.connect)()?;
    record::deliver_spool(conn.as_mut(), &dirs);

    let running = opts.host.running().map_err(AgentError::Running)?;
    let current = match fetch::current(conn.as_mut())? {
        None => None,
        Some(text) => Some(
            layout::parse_current(&text)
                .map_err(|_| AgentError::BadCurrent(text.chars().take(100).collect()))?,
        ),
    };

    // After a reboot into the applied system, no reboot is pending any more.
    if state.reboot_pending {
        if let (Some(booted), Some(applied)) = (opts.host.booted(), &state.applied) {
            if !opts.host.boot_files_differ(&booted, &applied.system) {
                state.reboot_pending = false;
                dirs.save(&state).map_err(state_err(&dirs.state_file()))?;
            }
        }
    }

    let facts = Facts {
        state: &state,
        current,
        running: running.as_ref(),
        force: opts.force,
        now: secs((opts.now)()),
        self_update: current.is_some_and(|v| self_update_wanted(cfg, &dirs, v)),
    };
    match decide::decide(&facts) {
        Decision::NoOp(reason) => Ok(no_op(opts, conn.as_mut(), &state, running.as_ref(), reason)),
        Decision::SelfUpdate(version) => {
            self_update::self_update(opts, &dirs, &mut state, &mut conn, version, running)
        }
        Decision::Apply(version) => {
            let mut run = Run::start(opts, &dirs, running.clone(), RunKind::Published);
            run.log.step(&format!(
                "applying version {} (running {})",
                version.short(),
                running.as_ref().map_or("nothing", |r| r.as_str())
            ));
            let mut attempt = Attempt {
                cfg,
                dirs: &dirs,
                host: opts.host,
                version,
                running: running.clone(),
                built: None,
                reboot_required: false,
                created: None,
                applied_created: state.applied.as_ref().and_then(|a| a.created.clone()),
                settings: None,
                previous: state.applied.as_ref().map(|a| a.version),
                installed: state.installed_files.clone(),
            };
            let result = attempt.run(&mut conn, opts, &mut run.log, &mut run.timings);
            run.finish(opts, &mut state, &mut conn, &attempt, result)
        }
    }
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

/// Ends a run that had nothing to do: the heartbeat says the host was seen.
pub(crate) fn no_op(
    opts: &UpdateOptions<'_>,
    sink: &mut dyn Sink,
    state: &State,
    running: Option<&StorePath>,
    reason: String,
) -> RunResult {
    heartbeat(sink, opts.config, state, running, (opts.now)());
    RunResult::NoOp { reason }
}
