//! What a run is given and what it gives back, shared by its steps: the options
//! (`UpdateOptions`), the result and its exit status (`RunResult`), the errors that stop a
//! run before it attempts anything (`AgentError`), how an attempt falls short
//! (`AttemptError`), and the run's own log. Kept apart so that deciding, applying and
//! recording each depend on it and never on one another in a circle.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::config::AgentConfig;
use super::host::Host;
use super::source::{Connection, Purpose, RemoteError, ServerUrl};
use crate::protocol::report::Report;

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
    #[error("agent.toml says host = \"{configured}\", but the live version {} on the server is host {live}'s: refusing to run as another host, nothing was written (set host = \"{live}\", or give this machine {configured}'s key)", .version.short())]
    WrongHost {
        configured: crate::protocol::HostName,
        live: crate::protocol::HostName,
        version: crate::protocol::manifest::Digest,
    },
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
    /// The source offers no freshness stamp that vouches for its live version: it may
    /// withhold newer versions, so nothing was done (`agent::fresh`).
    Stale {
        reason: String,
    },
}

impl RunResult {
    pub const EXIT_NOOP: u8 = 0;
    pub const EXIT_UPDATED: u8 = 10;
    pub const EXIT_FAILED: u8 = 11;
    pub const EXIT_ROLLED_BACK: u8 = 12;
    pub const EXIT_STALE: u8 = 13;

    pub fn exit_code(&self) -> u8 {
        match self {
            RunResult::NoOp { .. } => Self::EXIT_NOOP,
            RunResult::Updated(_) => Self::EXIT_UPDATED,
            RunResult::Failed(_) => Self::EXIT_FAILED,
            RunResult::RolledBack(_) => Self::EXIT_ROLLED_BACK,
            RunResult::Stale { .. } => Self::EXIT_STALE,
        }
    }
}

/// Opens a new connection to one source (`server` or a mirror), for the fetch or for the
/// confirmation after activation.
pub type Connect<'a> = dyn Fn(&ServerUrl, Purpose) -> Result<Box<dyn Connection>, RemoteError> + 'a;

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

/// Lines of build and activation output kept in a report (the full log goes alongside).
const LOG_TAIL_LINES: usize = 30;

pub(crate) fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::State {
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn secs(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The run's own log: every step and all build/activation output, for the report.
pub struct RunLog<'a> {
    pub text: String,
    pub on_progress: &'a dyn Fn(&str),
}

impl RunLog<'_> {
    pub fn step(&mut self, line: &str) {
        tracing::info!("{line}");
        (self.on_progress)(line);
        self.text.push_str(line);
        self.text.push('\n');
    }

    /// A step that went wrong (a failed check, a failed run): at WARN, so a journal filtered
    /// by priority shows it.
    pub fn warn(&mut self, line: &str) {
        tracing::warn!("{line}");
        (self.on_progress)(line);
        self.text.push_str(line);
        self.text.push('\n');
    }

    pub fn output(&mut self, text: &str) {
        self.text.push_str(text);
        if !text.is_empty() && !text.ends_with('\n') {
            self.text.push('\n');
        }
    }

    pub fn tail(&self) -> String {
        crate::nix::tail(&self.text, LOG_TAIL_LINES)
    }
}

/// How an attempt ended short of success.
pub enum AttemptError {
    /// The connection dropped mid-download: not the version's fault (no report, no back-off).
    Remote(RemoteError),
    Failed(String),
    RolledBack(String),
}
