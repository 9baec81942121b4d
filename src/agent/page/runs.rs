//! The one update this process runs at a time, what it printed and how it ended; and the
//! real runner, which is `agent::update` exactly as `bento agent update` calls it.
//!
//! Invariant: at most one run is unfinished. A press while one runs attaches to it (whatever
//! was pressed), so two tabs, or Update then Retry, never start two updates from one page;
//! the state directory's lock orders the page's run with the timer's.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::agent::config::AgentConfig;
use crate::agent::host::NixHost;
use crate::agent::{RunResult, UpdateOptions};
use crate::nix::Nix;
use crate::protocol::report::RunKind;

/// Progress lines kept per run (a run logs a dozen steps; this only bounds memory).
const MAX_RUN_LINES: usize = 2000;

/// Which button started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// The big button: the same rules as the timer (a version backing off or rolled back
    /// is left alone).
    Update,
    /// Retry: try the version that failed or was rolled back now, like
    /// `bento agent update --force`, so nobody needs a root shell for it.
    Retry,
}

/// Runs one update and says how it ended; `progress` receives lines for the person watching.
pub trait Runner: Send + Sync + 'static {
    fn run(&self, trigger: Trigger, progress: &dyn Fn(&str)) -> Finished;
}

/// How an update started from the page ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FinalOutcome {
    Updated,
    NothingToDo,
    Failed,
    RolledBack,
    /// The update could not run (configuration, state directory, server unreachable).
    Error,
}

impl FinalOutcome {
    pub(super) fn good(self) -> bool {
        matches!(self, FinalOutcome::Updated | FinalOutcome::NothingToDo)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finished {
    pub outcome: FinalOutcome,
    /// One sentence for the page.
    pub message: String,
    /// The status `bento agent update` exits with for the same result (docs/agent.md).
    pub exit_code: u8,
    /// RFC 3339, UTC.
    pub finished: String,
}

impl Finished {
    pub fn new(outcome: FinalOutcome, message: String, exit_code: u8) -> Self {
        Self {
            outcome,
            message,
            exit_code,
            finished: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        }
    }
}

/// The real update: `agent::update` with this machine's Nix and server, exactly as
/// `bento agent update` runs it (same lock, same steps, same report); Retry is its `--force`.
pub struct AgentRunner {
    pub config_path: PathBuf,
}

impl Runner for AgentRunner {
    fn run(&self, trigger: Trigger, progress: &dyn Fn(&str)) -> Finished {
        let cfg = match AgentConfig::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                return Finished::new(FinalOutcome::Error, format!("Could not update: {e}"), 1)
            }
        };
        progress(&match trigger {
            Trigger::Update => format!("checking {} for a new version", cfg.server),
            Trigger::Retry => format!("checking {} (retrying now, as asked)", cfg.server),
        });
        let host = NixHost::new(Nix::default().with_timeout(cfg.run_timeout), &cfg);
        let connect = cfg.run_connector();
        let on_wait =
            || progress("another update is running (the timer's or a terminal's); waiting for it");
        let result = crate::agent::update(&UpdateOptions {
            config: &cfg,
            host: &host,
            connect: &connect,
            now: &SystemTime::now,
            force: trigger == Trigger::Retry,
            on_wait: &on_wait,
            on_progress: progress,
        });
        match result {
            Ok(r) => finished_from(r),
            Err(e) => Finished::new(
                FinalOutcome::Error,
                format!("Could not update: {}", error_chain(&e)),
                1,
            ),
        }
    }
}

/// The page's sentence for each result of a run.
fn finished_from(r: RunResult) -> Finished {
    let code = r.exit_code();
    let err = |e: &Option<String>| e.clone().unwrap_or_else(|| "no details".into());
    let (outcome, message) = match &r {
        RunResult::NoOp { reason } => (
            FinalOutcome::NothingToDo,
            format!("Nothing to do: {}.", without_cli_hint(reason)),
        ),
        RunResult::Updated(rep) => (
            FinalOutcome::Updated,
            format!(
                "Updated to version {}{}.{}",
                rep.version.short(),
                match rep.kind {
                    RunKind::Published => "",
                    RunKind::AutoUpdated => " with newer flake inputs (self-update)",
                },
                if rep.reboot_required {
                    " Restart the machine to run its new kernel."
                } else {
                    ""
                }
            ),
        ),
        RunResult::Failed(rep) => (
            FinalOutcome::Failed,
            format!(
                "The update to version {} failed; this machine keeps what it ran before. {}",
                rep.version.short(),
                err(&rep.error)
            ),
        ),
        // Not good, though nothing failed here: the person should know updates may be held back.
        RunResult::Stale { reason } => (
            FinalOutcome::Failed,
            format!("Nothing was changed: this machine's update source may be out of date. {reason}"),
        ),
        RunResult::RolledBack(rep) => (
            FinalOutcome::RolledBack,
            format!(
                "Version {} was activated but the server was unreachable afterwards, so this machine went back to its previous system. {}",
                rep.version.short(),
                err(&rep.error)
            ),
        ),
    };
    Finished::new(outcome, message, code)
}

/// The agent's reasons end with a hint for a terminal (`(or bento agent update --force)`);
/// a person at the page has the Retry button instead, and often no root shell.
fn without_cli_hint(reason: &str) -> &str {
    match reason.rfind(" (or `bento agent update") {
        Some(i) if reason.ends_with(')') => &reason[..i],
        _ => reason,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[derive(Debug)]
pub(super) struct Run {
    pub(super) id: u64,
    pub(super) trigger: Trigger,
    pub(super) started: SystemTime,
    pub(super) lines: Vec<String>,
    pub(super) finished: Option<Finished>,
}

#[derive(Debug, Default)]
pub(super) struct Runs {
    next_id: u64,
    /// The latest run (running or finished); earlier ones are forgotten.
    pub(super) latest: Option<Run>,
}

impl Runs {
    pub(super) fn running(&self) -> Option<u64> {
        self.latest
            .as_ref()
            .filter(|r| r.finished.is_none())
            .map(|r| r.id)
    }
}

/// What the connections and the update thread share.
pub(super) struct Shared {
    pub(super) runs: Mutex<Runs>,
    /// Bumped on every change to `runs`, so event streams wake without polling.
    pub(super) changed: tokio::sync::watch::Sender<u64>,
    runner: Arc<dyn Runner>,
    pub(super) config_path: PathBuf,
    /// `Host` header values that name this listener; the first is the page's own URL.
    pub(super) hosts: Vec<String>,
    /// When the last connection or run ended (for `exit_when_idle`).
    pub(super) last_activity: Mutex<Instant>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves data that is still consistent here (a list of
    // lines and an Option), so a poisoned lock is used as is.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(super) fn new(runner: Arc<dyn Runner>, config_path: PathBuf, hosts: Vec<String>) -> Self {
        Self {
            runs: Mutex::new(Runs::default()),
            changed: tokio::sync::watch::Sender::new(0),
            runner,
            config_path,
            hosts,
            last_activity: Mutex::new(Instant::now()),
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(super) fn touch(&self) {
        *lock(&self.last_activity) = Instant::now();
    }

    /// Starts an update, or returns the one already running: `(run id, started now)`.
    pub(super) fn start_or_attach(self: &Arc<Self>, trigger: Trigger) -> (u64, bool) {
        let mut runs = lock(&self.runs);
        if let Some(id) = runs.running() {
            return (id, false);
        }
        runs.next_id += 1;
        let id = runs.next_id;
        runs.latest = Some(Run {
            id,
            trigger,
            started: SystemTime::now(),
            lines: Vec::new(),
            finished: None,
        });
        let shared = Arc::clone(self);
        // A thread of its own, outside the page's runtime: the update blocks for minutes and
        // its SFTP transport starts a runtime of its own, which tokio refuses inside another.
        let spawned = std::thread::Builder::new()
            .name("bento-update".into())
            .spawn(move || shared.run_update(id, trigger));
        if let Err(e) = spawned {
            if let Some(run) = runs.latest.as_mut() {
                run.finished = Some(Finished::new(
                    FinalOutcome::Error,
                    format!("Could not start the update: {e}"),
                    1,
                ));
            }
        }
        drop(runs);
        self.notify();
        (id, true)
    }

    fn run_update(&self, id: u64, trigger: Trigger) {
        let progress = |line: &str| {
            if let Some(run) = lock(&self.runs).latest.as_mut().filter(|r| r.id == id) {
                if run.lines.len() < MAX_RUN_LINES {
                    run.lines.push(line.to_owned());
                }
            }
            self.notify();
        };
        let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.runner.run(trigger, &progress)
        }))
        .unwrap_or_else(|_| {
            Finished::new(
                FinalOutcome::Error,
                "The update stopped unexpectedly (a bug in bento); see the journal.".into(),
                1,
            )
        });
        tracing::info!("update from the page: {}", finished.message);
        if let Some(run) = lock(&self.runs).latest.as_mut().filter(|r| r.id == id) {
            run.finished = Some(finished);
        }
        self.touch();
        self.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Counts its runs by trigger and blocks each until told to finish.
    struct Gate {
        calls: Mutex<Vec<Trigger>>,
        release: Mutex<mpsc::Receiver<()>>,
    }

    impl Runner for Gate {
        fn run(&self, trigger: Trigger, progress: &dyn Fn(&str)) -> Finished {
            lock(&self.calls).push(trigger);
            progress("working");
            let _ = lock(&self.release).recv_timeout(Duration::from_secs(10));
            Finished::new(FinalOutcome::NothingToDo, "done".into(), 0)
        }
    }

    fn wait_until_idle(shared: &Shared) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&shared.runs).running().is_some() {
            assert!(Instant::now() < deadline, "the run ends");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_second_press_attaches_to_the_running_update() {
        let (tx, rx) = mpsc::channel();
        let runner = Arc::new(Gate {
            calls: Mutex::new(Vec::new()),
            release: Mutex::new(rx),
        });
        let shared = Arc::new(Shared::new(
            runner.clone(),
            "/nonexistent".into(),
            vec!["127.0.0.1:1".into()],
        ));
        let (first, started) = shared.start_or_attach(Trigger::Update);
        assert!(started);
        // Retry pressed in another tab meanwhile: still one update.
        let (second, started) = shared.start_or_attach(Trigger::Retry);
        assert_eq!((second, started), (first, false), "attached");
        tx.send(()).unwrap();
        wait_until_idle(&shared);
        assert_eq!(*lock(&runner.calls), [Trigger::Update], "one update ran");
        {
            let runs = lock(&shared.runs);
            let run = runs.latest.as_ref().unwrap();
            assert_eq!(run.lines, ["working"]);
            assert_eq!(run.finished.as_ref().unwrap().message, "done");
        }
        // After the end a press starts a new run, and Retry reaches the runner as Retry.
        let (third, started) = shared.start_or_attach(Trigger::Retry);
        assert!(started && third > first, "a new run");
        tx.send(()).unwrap();
        wait_until_idle(&shared);
        assert_eq!(*lock(&runner.calls), [Trigger::Update, Trigger::Retry]);
    }

    #[test]
    fn the_page_drops_the_terminal_hint() {
        assert_eq!(
            without_cli_hint(
                "version abc failed; retrying in 4m (or `bento agent update --force`)"
            ),
            "version abc failed; retrying in 4m"
        );
        assert_eq!(
            without_cli_hint("up to date (version abc)"),
            "up to date (version abc)"
        );
    }
}
