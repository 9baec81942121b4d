//! One run of `bento agent update`. The decisions (no-op, back-off, rolled back) are made
//! from the state file and `current` alone, so the common case — nothing changed — costs one
//! connection, a read of `current` and a heartbeat.
//!
//! Order of an update, and why:
//! 1. fetch the manifest and the missing objects (verified; resumable);
//! 2. stage the configuration tree and swap `config/current`;
//! 3. build — before touching any file on the machine, so a failed build changes nothing;
//! 4. install `files` entries, point the system profile at the build, activate;
//! 5. confirm over a *fresh* connection (the old one may have survived a network the new
//!    system broke) and roll back to the exact store path that ran before if it fails;
//! 6. report: spooled first, then delivered, so no report is ever lost.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::config::{AgentConfig, Mode};
use super::files;
use super::state::{Applied, LastRun, State, StateDir};
use super::system::System;
use crate::agent::transport::{Transport, TransportError};
use crate::nix::{StorePath, Target};
use crate::protocol::layout;
use crate::protocol::manifest::{Build, Digest, Manifest, MAX_MANIFEST_BYTES};
use crate::protocol::report::{self, Heartbeat, Outcome, Report, RunKind, Timings};
use crate::protocol::settings::{self, HostSettings, RebootAction, RebootPolicy};
use crate::sys::atomic::Lock;

/// Lines of build and activation output kept in a report (the full log goes alongside).
const LOG_TAIL_LINES: usize = 30;
/// Pause between attempts to reach the server after activation.
const CONFIRM_RETRY: Duration = Duration::from_secs(2);
/// How long a notification command may run.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);
/// A self-update (re-locking flake inputs) is tried at most this often.
const SELF_UPDATE_EVERY: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Transport(#[from] TransportError),
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

pub struct UpdateOptions<'a> {
    pub config: &'a AgentConfig,
    pub system: &'a dyn System,
    /// Opens a new connection to the server (called again for the confirmation).
    pub connect: &'a dyn Fn() -> Result<Box<dyn Transport>, TransportError>,
    pub now: &'a dyn Fn() -> SystemTime,
    /// Retry a failed or rolled-back version now.
    pub force: bool,
    /// Called when another run holds the lock and this one waits.
    pub on_wait: &'a dyn Fn(),
    /// Progress lines for a person watching (the trigger page, a terminal).
    pub on_progress: &'a dyn Fn(&str),
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::State {
        path: path.to_owned(),
        source,
    }
}

/// The run's own log: every step and all build/activation output, for the report.
struct RunLog<'a> {
    text: String,
    on_progress: &'a dyn Fn(&str),
}

impl RunLog<'_> {
    fn step(&mut self, line: &str) {
        tracing::info!("{line}");
        (self.on_progress)(line);
        self.text.push_str(line);
        self.text.push('\n');
    }

    fn output(&mut self, text: &str) {
        self.text.push_str(text);
        if !text.is_empty() && !text.ends_with('\n') {
            self.text.push('\n');
        }
    }

    fn tail(&self) -> String {
        crate::nix::tail(&self.text, LOG_TAIL_LINES)
    }
}

/// One update run. Errors are problems that stop the run before a version is attempted
/// (no report); everything after that ends in a report.
pub fn update(opts: &UpdateOptions<'_>) -> Result<RunResult, AgentError> {
    let cfg = opts.config;
    let dirs = StateDir::new(&cfg.state_dir);
    dirs.create().map_err(state_err(&dirs.root))?;
    let _lock = Lock::acquire(&dirs.lock(), opts.on_wait).map_err(state_err(&dirs.lock()))?;
    dirs.remove_leftovers();
    let mut state = dirs.load().map_err(state_err(&dirs.state_file()))?;

    let mut transport = (opts.connect)()?;
    deliver_spool(transport.as_mut(), &dirs);

    let running = opts.system.running().map_err(AgentError::Running)?;
    let Some(text) = transport.read_current()? else {
        let reason = "nothing is published for this host yet".into();
        return Ok(no_op(
            opts,
            transport.as_mut(),
            &state,
            running.as_ref(),
            reason,
        ));
    };
    let version = layout::parse_current(&text)
        .map_err(|_| AgentError::BadCurrent(text.chars().take(100).collect()))?;

    // After a reboot into the applied system, no reboot is pending any more.
    if state.reboot_pending {
        if let (Some(booted), Some(applied)) = (booted_system(cfg), &state.applied) {
            if !boot_files_differ(&booted, &applied.system) {
                state.reboot_pending = false;
                dirs.save(&state).map_err(state_err(&dirs.state_file()))?;
            }
        }
    }

    let now = secs((opts.now)());
    if is_up_to_date(&state, &version, running.as_ref()) {
        if self_update_due(cfg, &dirs, &state, version, now) {
            return self_update(opts, &dirs, &mut state, &mut transport, version, running);
        }
        let reason = format!("up to date (version {})", version.short());
        return Ok(no_op(
            opts,
            transport.as_mut(),
            &state,
            running.as_ref(),
            reason,
        ));
    }
    if let Some(reason) = skip_reason(&state, &version, opts.force, now) {
        return Ok(no_op(
            opts,
            transport.as_mut(),
            &state,
            running.as_ref(),
            reason,
        ));
    }

    let mut run = Run::start(opts, &dirs, running.clone(), RunKind::Published);
    run.log.step(&format!(
        "applying version {} (running {})",
        version.short(),
        running.as_ref().map_or("nothing", |r| r.as_str())
    ));
    let mut attempt = Attempt {
        cfg,
        dirs: &dirs,
        system: opts.system,
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
    let result = attempt.run(&mut transport, opts, &mut run.log, &mut run.timings);
    run.finish(opts, &mut state, &mut transport, &attempt, result)
}

/// Ends a run that had nothing to do: the heartbeat says the host was seen.
fn no_op(
    opts: &UpdateOptions<'_>,
    transport: &mut dyn Transport,
    state: &State,
    running: Option<&StorePath>,
    reason: String,
) -> RunResult {
    heartbeat(transport, opts.config, state, running, (opts.now)());
    RunResult::NoOp { reason }
}

/// Whether this run should try a self-update: enabled (snapshot over agent.toml), a flake
/// host, and none tried in the last day.
fn self_update_due(
    cfg: &AgentConfig,
    dirs: &StateDir,
    state: &State,
    version: Digest,
    now: u64,
) -> bool {
    let config_dir = dirs.config().join(version.to_hex());
    let effective = Effective::of(cfg, snapshot_settings(&config_dir).as_ref());
    effective.self_update
        && config_dir.join("flake.nix").is_file()
        && state
            .self_update_at
            .is_none_or(|t| now.saturating_sub(t) >= SELF_UPDATE_EVERY.as_secs())
}

/// Re-locks the applied version's flake inputs in a copy of its tree and, if the system
/// changes, applies it like a published version (confirm, rollback) reported as
/// `auto-updated`.
fn self_update(
    opts: &UpdateOptions<'_>,
    dirs: &StateDir,
    state: &mut State,
    transport: &mut Box<dyn Transport>,
    version: Digest,
    running: Option<StorePath>,
) -> Result<RunResult, AgentError> {
    let cfg = opts.config;
    state.self_update_at = Some(secs((opts.now)()));
    dirs.save(state).map_err(state_err(&dirs.state_file()))?;
    let applied_dir = dirs.config().join(version.to_hex());
    let work = dirs.config().join(".self-update");
    let copy = || -> std::io::Result<()> {
        if work.exists() {
            std::fs::remove_dir_all(&work)?;
        }
        copy_tree(&applied_dir, &work)
    };
    if let Err(e) = copy() {
        return Err(AgentError::State {
            path: work,
            source: e,
        });
    }
    let mut run = Run::start(opts, dirs, running.clone(), RunKind::AutoUpdated);
    run.log.step(&format!(
        "self-update of version {}: re-locking flake inputs",
        version.short()
    ));
    let mut attempt = Attempt {
        cfg,
        dirs,
        system: opts.system,
        version,
        running: running.clone(),
        built: None,
        reboot_required: false,
        created: None,
        applied_created: None,
        settings: snapshot_settings(&applied_dir),
        previous: Some(version),
        installed: state.installed_files.clone(),
    };
    match opts.system.relock(&work) {
        Ok(false) => {
            let _ = std::fs::remove_dir_all(&work);
            let reason = format!(
                "up to date (version {}); no flake input moved",
                version.short()
            );
            Ok(no_op(
                opts,
                transport.as_mut(),
                state,
                running.as_ref(),
                reason,
            ))
        }
        Ok(true) => {
            let target = Target::Flake {
                dir: work.clone(),
                host: cfg.host.to_string(),
            };
            let result = attempt.apply(
                &target,
                None,
                transport,
                opts,
                &mut run.log,
                &mut run.timings,
            );
            if matches!(result, Ok(Outcome::Success)) && attempt.built.as_ref() == running.as_ref()
            {
                let _ = std::fs::remove_dir_all(&work);
                let reason = format!(
                    "up to date (version {}); new inputs build the same system",
                    version.short()
                );
                return Ok(no_op(
                    opts,
                    transport.as_mut(),
                    state,
                    running.as_ref(),
                    reason,
                ));
            }
            run.finish(opts, state, transport, &attempt, result)
        }
        Err(e) => {
            run.log.output(e.log());
            let result = Err(AttemptError::Failed(format!(
                "self-update: {}",
                first_error_line(&e.to_string())
            )));
            run.finish(opts, state, transport, &attempt, result)
        }
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        let ft = entry.file_type()?;
        if ft.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else if ft.is_file() {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

/// The effective settings: the snapshot's `bento-host.json` (the sysadmin's word, from
/// bento.toml) over agent.toml.
#[derive(Debug, Clone)]
pub(crate) struct Effective {
    pub mode: Mode,
    pub reboot: RebootPolicy,
    pub reboot_at: String,
    pub self_update: bool,
    pub notify: Option<Vec<String>>,
}

impl Effective {
    fn of(cfg: &AgentConfig, snapshot: Option<&HostSettings>) -> Self {
        match snapshot {
            Some(s) => Self {
                mode: s.mode,
                reboot: s.reboot,
                reboot_at: s.reboot_at.clone(),
                self_update: s.self_update,
                notify: s.notify.clone(),
            },
            None => Self {
                mode: cfg.mode,
                reboot: cfg.reboot,
                reboot_at: cfg.reboot_at.clone(),
                self_update: cfg.self_update,
                notify: cfg.notify.clone(),
            },
        }
    }
}

/// Reads the settings file of a staged configuration tree, if it has one.
fn snapshot_settings(config_dir: &Path) -> Option<HostSettings> {
    let bytes = std::fs::read(config_dir.join(settings::FILE)).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                "ignoring {}: {e}",
                config_dir.join(settings::FILE).display()
            );
            None
        }
    }
}

/// A run that tries something (a published version or a self-update) and ends in a report.
struct Run<'a> {
    log: RunLog<'a>,
    timings: Timings,
    started_at: SystemTime,
    clock: Instant,
    dirs: &'a StateDir,
    running: Option<StorePath>,
    kind: RunKind,
}

impl<'a> Run<'a> {
    fn start(
        opts: &UpdateOptions<'a>,
        dirs: &'a StateDir,
        running: Option<StorePath>,
        kind: RunKind,
    ) -> Self {
        Run {
            log: RunLog {
                text: String::new(),
                on_progress: opts.on_progress,
            },
            timings: Timings::default(),
            started_at: (opts.now)(),
            clock: Instant::now(),
            dirs,
            running,
            kind,
        }
    }

    /// Records the outcome: state, spool, delivery, heartbeat, notification, reboot.
    fn finish(
        mut self,
        opts: &UpdateOptions<'_>,
        state: &mut State,
        transport: &mut Box<dyn Transport>,
        attempt: &Attempt<'_>,
        result: Result<Outcome, AttemptError>,
    ) -> Result<RunResult, AgentError> {
        let cfg = opts.config;
        let dirs = self.dirs;
        let version = attempt.version;
        let (outcome, error) = match result {
            Ok(o) => (o, None),
            Err(AttemptError::Transport(e)) => {
                // The connection dropped mid-download: not the version's fault. Partial
                // downloads resume on the next run; no back-off, no report.
                self.log.step(&format!("interrupted: {e}"));
                return Err(AgentError::Transport(e));
            }
            Err(AttemptError::Failed(msg)) => (Outcome::Failure, Some(msg)),
            Err(AttemptError::RolledBack(msg)) => (Outcome::Rollback, Some(msg)),
        };
        match &error {
            Some(e) => self.log.step(&format!("{}: {e}", outcome.as_str())),
            None => self.log.step("success"),
        }
        self.timings.total_ms = self.clock.elapsed().as_millis() as u64;
        let finished = (opts.now)();
        let system_after = opts.system.running().ok().flatten();
        let effective = Effective::of(cfg, attempt.settings.as_ref());
        let reboot = settings::reboot_action(
            effective.reboot,
            &effective.reboot_at,
            outcome == Outcome::Success && attempt.reboot_required,
        );
        let report = Report {
            format: report::FORMAT,
            id: report::new_id(self.started_at),
            host: cfg.host.clone(),
            kind: self.kind,
            version,
            previous_version: state.applied.as_ref().map(|a| a.version),
            outcome,
            system_before: self.running.as_ref().map(|p| p.to_string()),
            system_after: system_after.as_ref().map(|p| p.to_string()),
            built_system: attempt.built.as_ref().map(|p| p.to_string()),
            started: rfc3339(self.started_at),
            finished: rfc3339(finished),
            timings: self.timings.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            error: error
                .as_ref()
                .map(|e| e.lines().next().unwrap_or_default().to_owned()),
            log_tail: self.log.tail(),
            reboot_required: attempt.reboot_required,
        };

        // State first: whatever happens to the report, the machine knows what it did.
        state.installed_files = attempt.installed.clone();
        match (outcome, self.kind) {
            (Outcome::Success, _) => {
                let system = attempt.built.clone().expect("a success has a build");
                let created = match self.kind {
                    RunKind::Published => attempt.created.clone(),
                    RunKind::AutoUpdated => state.applied.as_ref().and_then(|a| a.created.clone()),
                };
                state.applied = Some(Applied {
                    version,
                    system,
                    at: secs(finished),
                    created,
                });
                state.auto_updated = self.kind == RunKind::AutoUpdated;
                state.last_success = Some(secs(finished));
                state.failures = None;
                state.reboot_pending = state.reboot_pending || attempt.reboot_required;
            }
            (Outcome::Failure, RunKind::Published) => state.record_failure(version, secs(finished)),
            (Outcome::Rollback, RunKind::Published) => state.record_rollback(version),
            // A failed self-update is retried at the next self-update time, like any other.
            (_, RunKind::AutoUpdated) => {}
        }
        state.last = Some(LastRun {
            id: report.id.clone(),
            version,
            outcome,
            finished: secs(finished),
            error: report.error.clone(),
        });
        // The report is spooled before the state records the run: a kill in between then
        // costs a second, truthful report (the next run re-applies and finds the build
        // running), never a lost one.
        spool(dirs, &report, &self.log.text).map_err(state_err(&dirs.spool()))?;
        dirs.save(state).map_err(state_err(&dirs.state_file()))?;
        if outcome == Outcome::Success {
            if let Err(e) = collect_cache(dirs, state) {
                tracing::warn!("cleaning the local cache: {e}");
            }
        }

        // Deliver over the connection still open (after a confirmation, the fresh one).
        let delivered = if outcome != Outcome::Rollback {
            let ok = deliver_spool(transport.as_mut(), dirs);
            heartbeat(
                transport.as_mut(),
                cfg,
                state,
                system_after.as_ref(),
                finished,
            );
            ok
        } else {
            false
        };
        if outcome != Outcome::Success {
            if let Some(cmd) = &effective.notify {
                notify(cmd, &report);
            }
        }
        match &reboot {
            RebootAction::None => {}
            // Only after the report is on the server: the reboot must not lose it.
            RebootAction::Now if delivered => reboot_now(cfg, &mut self.log),
            RebootAction::Now => {
                tracing::warn!("reboot postponed: the report is not delivered yet")
            }
            RebootAction::At(when) => schedule_reboot(cfg, when),
        }
        Ok(match outcome {
            Outcome::Success => RunResult::Updated(Box::new(report)),
            Outcome::Failure => RunResult::Failed(Box::new(report)),
            Outcome::Rollback => RunResult::RolledBack(Box::new(report)),
        })
    }
}

/// Runs the notification command with the report on stdin (bounded; never fatal).
fn notify(cmd: &[String], report: &Report) {
    use std::process::{Command, Stdio};
    let Some((program, args)) = cmd.split_first() else {
        return;
    };
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("notify command {program}: {e}");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&report.to_bytes());
    }
    let deadline = Instant::now() + NOTIFY_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if !status.success() => {
                tracing::warn!("notify command {program} exited with {status}");
                return;
            }
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() >= deadline => {
                tracing::warn!(
                    "notify command {program} still running after {NOTIFY_TIMEOUT:?}; killed"
                );
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                tracing::warn!("notify command {program}: {e}");
                return;
            }
        }
    }
}

fn reboot_now(cfg: &AgentConfig, log: &mut RunLog<'_>) {
    use std::process::Command;
    let commands: Vec<Vec<String>> = match &cfg.reboot_command {
        Some(c) => vec![c.clone()],
        // kexec skips the firmware where the machine can; reboot otherwise.
        None => vec![
            vec!["systemctl".into(), "kexec".into()],
            vec!["systemctl".into(), "reboot".into()],
        ],
    };
    for cmd in commands {
        let Some((program, args)) = cmd.split_first() else {
            continue;
        };
        log.step(&format!("rebooting: {}", cmd.join(" ")));
        match Command::new(program).args(args).status() {
            Ok(s) if s.success() => return,
            Ok(s) => tracing::warn!("{} exited with {s}", cmd.join(" ")),
            Err(e) => tracing::warn!("{}: {e}", cmd.join(" ")),
        }
    }
}

/// Asks systemd to reboot at the next `when` (a calendar expression), replacing an earlier
/// schedule.
fn schedule_reboot(cfg: &AgentConfig, when: &str) {
    use std::process::Command;
    let reboot: Vec<String> = cfg
        .reboot_command
        .clone()
        .unwrap_or_else(|| vec!["systemctl".into(), "reboot".into()]);
    let _ = Command::new("systemctl")
        .args(["stop", "bento-reboot.timer"])
        .status();
    let status = Command::new("systemd-run")
        .args([
            "--unit=bento-reboot",
            "--on-calendar",
            when,
            "--timer-property=AccuracySec=1min",
            "--",
        ])
        .args(&reboot)
        .status();
    match status {
        Ok(s) if s.success() => tracing::info!("reboot scheduled for {when}"),
        Ok(s) => {
            tracing::warn!("could not schedule the reboot for {when}: systemd-run exited with {s}")
        }
        Err(e) => tracing::warn!("could not schedule the reboot for {when}: {e}"),
    }
}

/// `version` is applied and its system is the one running.
fn is_up_to_date(state: &State, version: &Digest, running: Option<&StorePath>) -> bool {
    state
        .applied
        .as_ref()
        .is_some_and(|a| &a.version == version && Some(&a.system) == running)
}

/// Why this run should not try `version` (not up to date) now, if it should not.
fn skip_reason(state: &State, version: &Digest, force: bool, now: u64) -> Option<String> {
    if force {
        return None;
    }
    if state.rolled_back.contains(version) {
        return Some(format!(
            "version {} was rolled back; waiting for a newer one (or `bento agent update --force`)",
            version.short()
        ));
    }
    // A clock set back since the failure: retry now rather than wait for it to catch up.
    let clock_went_back = state
        .failures
        .as_ref()
        .is_some_and(|f| &f.version == version && now < f.last);
    if let Some(at) = state.retry_at(version).filter(|_| !clock_went_back) {
        if now < at {
            let wait = Duration::from_secs(at - now);
            return Some(format!(
                "version {} failed; retrying in {} (or `bento agent update --force`)",
                version.short(),
                humantime::format_duration(wait)
            ));
        }
    }
    None
}

enum AttemptError {
    Transport(TransportError),
    Failed(String),
    RolledBack(String),
}

struct Attempt<'a> {
    cfg: &'a AgentConfig,
    dirs: &'a StateDir,
    system: &'a dyn System,
    version: Digest,
    running: Option<StorePath>,
    built: Option<StorePath>,
    reboot_required: bool,
    /// The new manifest's `created` time, once fetched.
    created: Option<String>,
    /// The applied manifest's `created` time (replay protection).
    applied_created: Option<String>,
    /// The settings that came with the version (bento-host.json).
    settings: Option<HostSettings>,
    /// The version applied before this run (whose files a rollback puts back).
    previous: Option<Digest>,
    /// Targets of the files installed on the machine now; `finish` records them in the state.
    installed: Vec<String>,
}

impl Attempt<'_> {
    fn run(
        &mut self,
        transport: &mut Box<dyn Transport>,
        opts: &UpdateOptions<'_>,
        log: &mut RunLog<'_>,
        timings: &mut Timings,
    ) -> Result<Outcome, AttemptError> {
        let failed = |e: &dyn std::fmt::Display| AttemptError::Failed(e.to_string());

        // 1. Fetch.
        let t = Instant::now();
        let rel = format!("{}/{}.json", layout::MANIFESTS, self.version);
        let bytes = transport
            .read_small(&rel, MAX_MANIFEST_BYTES)
            .map_err(AttemptError::Transport)?;
        let manifest = Manifest::parse_untrusted(&bytes, &self.version, &self.cfg.host)
            .map_err(|e| AttemptError::Failed(format!("manifest {}: {e}", self.version.short())))?;
        self.check_trust(transport, &bytes, &manifest, log)?;
        self.created = Some(manifest.created.clone());
        let mpath = self.dirs.manifests().join(format!("{}.json", self.version));
        crate::sys::atomic::write_file(&mpath, &bytes, 0o600).map_err(|e| failed(&e))?;
        let sizes: BTreeMap<Digest, u64> = manifest
            .config
            .iter()
            .filter_map(|e| match e {
                crate::protocol::manifest::ConfigEntry::File { sha256, size, .. } => {
                    Some((*sha256, *size))
                }
                _ => None,
            })
            .chain(manifest.files.iter().map(|f| (f.sha256, f.size)))
            .collect();
        let missing: Vec<(Digest, u64)> = sizes
            .iter()
            .filter(|(d, _)| !self.dirs.objects().join(d.to_hex()).exists())
            .map(|(d, s)| (*d, *s))
            .collect();
        log.step(&format!(
            "fetching {} of {} objects",
            missing.len(),
            sizes.len()
        ));
        match transport.fetch_objects(&missing, &self.dirs.objects()) {
            Ok(n) => log.step(&format!("fetched {}", crate::sys::output::bytes(n))),
            Err(e @ TransportError::BadObject { .. }) => return Err(failed(&e)),
            Err(e) => return Err(AttemptError::Transport(e)),
        }
        timings.fetch_ms = Some(t.elapsed().as_millis() as u64);

        // 2. Stage the configuration.
        let config_dir = files::stage_config(
            &manifest,
            &self.version,
            &self.dirs.objects(),
            &self.dirs.config(),
        )
        .map_err(|e| failed(&e))?;

        self.settings = snapshot_settings(&config_dir);
        let target = match manifest.build {
            Build::Flake => Target::Flake {
                dir: config_dir.clone(),
                host: self.cfg.host.to_string(),
            },
            Build::Classic => Target::Classic {
                dir: config_dir.clone(),
            },
        };
        self.apply(&target, Some(&manifest), transport, opts, log, timings)
    }

    /// Builds `target`, installs the manifest's files (a published version), activates and
    /// confirms, rolling back on a lost server.
    fn apply(
        &mut self,
        target: &Target,
        manifest: Option<&Manifest>,
        transport: &mut Box<dyn Transport>,
        opts: &UpdateOptions<'_>,
        log: &mut RunLog<'_>,
        timings: &mut Timings,
    ) -> Result<Outcome, AttemptError> {
        let failed = |e: &dyn std::fmt::Display| AttemptError::Failed(e.to_string());
        let effective = Effective::of(self.cfg, self.settings.as_ref());

        // Build: before touching anything on the machine.
        let t = Instant::now();
        log.step("building");
        let built = match self.system.build(target) {
            Ok(b) => b,
            Err(e) => {
                log.output(e.log());
                timings.build_ms = Some(t.elapsed().as_millis() as u64);
                return Err(AttemptError::Failed(format!(
                    "build failed: {}",
                    first_error_line(&e.to_string())
                )));
            }
        };
        log.output(&built.log);
        timings.build_ms = Some(t.elapsed().as_millis() as u64);
        log.step(&format!("built {}", built.path));
        self.built = Some(built.path.clone());
        if let Some(expected) = manifest.and_then(|m| m.system.as_ref()) {
            if expected != &built.path {
                log.step(&format!("note: the server expected {expected}"));
            }
        }
        let booted = booted_system(self.cfg).or_else(|| self.running.clone());
        self.reboot_required = booted
            .as_ref()
            .is_some_and(|r| boot_files_differ(r, &built.path));

        // Files, profile, activation.
        if let Some(manifest) = manifest {
            self.installed = files::install_files(
                &manifest.files,
                &self.dirs.objects(),
                &self.cfg.files_root,
                &self.installed,
                &self.cfg.identity_file, // secrets: decrypts encrypted entries
            )
            .map_err(|e| failed(&e))?;
            self.persist_installed().map_err(|e| failed(&e))?;
        }

        if self.running.as_ref() == Some(&built.path) {
            log.step("the build is the running system: nothing to activate");
            return Ok(Outcome::Success);
        }
        let t = Instant::now();
        let mode = effective.mode;
        log.step(&format!("activating ({})", mode.as_str()));
        self.system
            .set_profile(&built.path)
            .map_err(|e| failed(&e))?;
        match self.system.activate(&built.path, mode) {
            Ok(out) => log.output(&out),
            Err(e) => {
                log.output(&e.output);
                let restored = self.restore(log, mode);
                timings.activate_ms = Some(t.elapsed().as_millis() as u64);
                return Err(AttemptError::Failed(format!(
                    "activation failed ({}){restored}",
                    e.status
                )));
            }
        }
        timings.activate_ms = Some(t.elapsed().as_millis() as u64);
        if !mode.activates_now() {
            return Ok(Outcome::Success);
        }

        // Confirm over a fresh connection.
        let t = Instant::now();
        log.step("checking that the server is still reachable");
        let deadline = Instant::now() + self.cfg.confirm_timeout;
        let fresh = loop {
            match (opts.connect)() {
                Ok(c) => break Some(c),
                Err(e) => {
                    log.step(&format!("server not reachable: {e}"));
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break None;
                    }
                    std::thread::sleep(CONFIRM_RETRY.min(left));
                }
            }
        };
        timings.confirm_ms = Some(t.elapsed().as_millis() as u64);
        match fresh {
            Some(c) => {
                let old = std::mem::replace(transport, c);
                let _ = old.close();
                Ok(Outcome::Success)
            }
            None if self.running.is_some() => {
                let restored = self.restore(log, mode);
                Err(AttemptError::RolledBack(format!(
                    "server unreachable for {} after activation{restored}",
                    humantime::format_duration(self.cfg.confirm_timeout)
                )))
            }
            None => Err(AttemptError::Failed(
                "server unreachable after activation, and there is no earlier system to go back to"
                    .into(),
            )),
        }
    }

    /// Refuses a manifest not signed by a trusted key (when keys are configured) and one
    /// older than the version already applied (a replayed snapshot).
    fn check_trust(
        &self,
        transport: &mut Box<dyn Transport>,
        bytes: &[u8],
        manifest: &Manifest,
        log: &mut RunLog<'_>,
    ) -> Result<(), AttemptError> {
        let short = self.version.short();
        if self.cfg.trusted_keys.is_empty() {
            log.step("note: no trusted_keys configured; the manifest's signature is not checked");
        } else {
            let trusted = crate::protocol::signing::parse_trusted(&self.cfg.trusted_keys)
                .map_err(|e| AttemptError::Failed(e.to_string()))?;
            let rel = format!("{}/{}.sig", layout::MANIFESTS, self.version);
            let sig =
                match transport.read_small(&rel, crate::protocol::signing::MAX_SIGNATURE_BYTES) {
                    Ok(sig) => sig,
                    Err(TransportError::NotFound { .. }) => {
                        return Err(AttemptError::Failed(format!(
                            "manifest {short} is not signed; refusing it"
                        )));
                    }
                    Err(e) => return Err(AttemptError::Transport(e)),
                };
            crate::protocol::signing::verify(&trusted, bytes, &sig)
                .map_err(|e| AttemptError::Failed(format!("manifest {short}: {e}")))?;
            log.step("signature verified");
        }
        if let Some(applied) = &self.applied_created {
            let time = |t: &str| humantime::parse_rfc3339_weak(t).ok();
            let older = match (time(&manifest.created), time(applied)) {
                (Some(new), Some(old)) => new < old,
                // An unreadable time cannot prove a replay; the signature still holds.
                _ => false,
            };
            if older {
                return Err(AttemptError::Failed(format!(
                    "manifest {short} was created {}, before the applied version ({applied}); refusing a replayed older snapshot",
                    manifest.created
                )));
            }
        }
        Ok(())
    }

    /// Records the installed targets at once, so a run killed before it ends still leaves
    /// the next one knowing which files are on the machine.
    fn persist_installed(&self) -> std::io::Result<()> {
        let mut on_disk = self.dirs.load()?;
        on_disk.installed_files = self.installed.clone();
        self.dirs.save(&on_disk)
    }

    /// Puts back the `files` entries of the applied version (a published attempt installed
    /// its own before activating).
    fn restore_files(&mut self, log: &mut RunLog<'_>) {
        let Some(previous) = self.previous.filter(|p| *p != self.version) else {
            return;
        };
        let path = self.dirs.manifests().join(format!("{previous}.json"));
        let Some(manifest) = std::fs::read(&path)
            .ok()
            .and_then(|b| Manifest::parse(&b).ok())
        else {
            log.step(
                "note: the previous version's files could not be restored (its manifest is gone)",
            );
            return;
        };
        match files::install_files(
            &manifest.files,
            &self.dirs.objects(),
            &self.cfg.files_root,
            &self.installed,
            &self.cfg.identity_file, // secrets: the previous plaintext, decrypted again
        ) {
            Ok(installed) => {
                self.installed = installed;
                if let Err(e) = self.persist_installed() {
                    log.step(&format!("note: cannot record the restored files: {e}"));
                }
            }
            Err(e) => log.step(&format!(
                "note: restoring the previous version's files failed: {e}"
            )),
        }
    }

    /// Puts back the system that ran before this run, by its store path.
    fn restore(&mut self, log: &mut RunLog<'_>, mode: Mode) -> String {
        let Some(prev) = self.running.clone() else {
            return String::new();
        };
        log.step(&format!("going back to {prev}"));
        self.restore_files(log);
        let prev = &prev;
        if let Err(e) = self.system.set_profile(prev) {
            log.step(&format!("could not reset the profile: {e}"));
            return format!(
                "; restoring {prev} failed: {}",
                first_error_line(&e.to_string())
            );
        }
        match self.system.activate(prev, mode) {
            Ok(out) => {
                log.output(&out);
                format!("; back on {prev}")
            }
            Err(e) => {
                log.output(&e.output);
                format!("; re-activating {prev} failed too ({})", e.status)
            }
        }
    }
}

fn first_error_line(text: &str) -> String {
    text.lines()
        .find(|l| l.contains("error"))
        .or_else(|| text.lines().next())
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The system the machine booted, when it can be told.
fn booted_system(cfg: &AgentConfig) -> Option<StorePath> {
    crate::nix::profile_target(&cfg.booted_system)
        .ok()
        .flatten()
}

/// True when the kernel, initrd or kernel modules differ: the new system needs a reboot to
/// run fully.
fn boot_files_differ(a: &StorePath, b: &StorePath) -> bool {
    ["kernel", "initrd", "kernel-modules"].iter().any(|f| {
        let read = |p: &StorePath| std::fs::canonicalize(p.as_path().join(f)).ok();
        read(a) != read(b)
    })
}

/// Writes the report (and its gzipped log) into the spool.
fn spool(dirs: &StateDir, report: &Report, log: &str) -> std::io::Result<()> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(log.as_bytes())?;
    let gz = gz.finish()?;
    crate::sys::atomic::write_file(
        &dirs.spool().join(format!("{}.log.gz", report.id)),
        &gz,
        0o600,
    )?;
    crate::sys::atomic::write_file(
        &dirs.spool().join(format!("{}.json", report.id)),
        &report.to_bytes(),
        0o600,
    )
}

/// Delivers spooled reports, oldest first. A report leaves the spool only once the server
/// has it; delivering one twice writes the same file twice (ids are unique), never a copy.
fn deliver_spool(t: &mut dyn Transport, dirs: &StateDir) -> bool {
    let mut ids: Vec<String> = match std::fs::read_dir(dirs.spool()) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_owned)
            })
            .filter(|n| !n.starts_with('.'))
            .collect(),
        Err(_) => return false,
    };
    ids.sort();
    for id in ids {
        let json = dirs.spool().join(format!("{id}.json"));
        let gz = dirs.spool().join(format!("{id}.log.gz"));
        let Ok(bytes) = std::fs::read(&json) else {
            continue;
        };
        let Ok(report) = Report::parse(&bytes) else {
            tracing::warn!("dropping unreadable spooled report {}", json.display());
            let _ = std::fs::remove_file(&json);
            continue;
        };
        let send = |t: &mut dyn Transport| -> Result<(), TransportError> {
            if let Ok(log) = std::fs::read(&gz) {
                t.write_log(&report.log_file_name(), &log)?;
            }
            t.write_log(&report.file_name(), &bytes)?;
            t.write_log(report::LATEST_FILE, &bytes)
        };
        match send(t) {
            Ok(()) => {
                let _ = std::fs::remove_file(&json);
                let _ = std::fs::remove_file(&gz);
                tracing::debug!("delivered report {id}");
            }
            Err(e) => {
                tracing::warn!("report {id} stays spooled: {e}");
                return false;
            }
        }
    }
    true
}

fn heartbeat(
    t: &mut dyn Transport,
    cfg: &AgentConfig,
    state: &State,
    running: Option<&StorePath>,
    now: SystemTime,
) {
    let version = state
        .applied
        .as_ref()
        .filter(|a| Some(&a.system) == running)
        .map(|a| a.version);
    let hb = Heartbeat {
        format: report::FORMAT,
        host: cfg.host.clone(),
        time: rfc3339(now),
        version,
        system: running.map(|p| p.to_string()),
        last_outcome: state.last.as_ref().map(|l| l.outcome),
        last_report: state.last.as_ref().map(|l| l.id.clone()),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        reboot_pending: state.reboot_pending,
        auto_updated: version.is_some() && state.auto_updated,
        last_success: state
            .last_success
            .map(|t| rfc3339(UNIX_EPOCH + Duration::from_secs(t))),
    };
    if let Err(e) = t.write_log(report::HEARTBEAT_FILE, &hb.to_bytes()) {
        tracing::warn!("could not write the heartbeat: {e}");
    }
}

/// Keeps cached objects, manifests and configuration trees of the applied version only.
fn collect_cache(dirs: &StateDir, state: &State) -> std::io::Result<()> {
    let Some(applied) = &state.applied else {
        return Ok(());
    };
    let mpath = dirs.manifests().join(format!("{}.json", applied.version));
    let manifest = Manifest::parse(&std::fs::read(&mpath)?)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let keep: std::collections::BTreeSet<String> =
        manifest.objects().iter().map(Digest::to_hex).collect();
    for entry in std::fs::read_dir(dirs.objects())? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Partial downloads of other versions are dropped too.
        if !keep.contains(&name) {
            std::fs::remove_file(entry.path())?;
        }
    }
    for entry in std::fs::read_dir(dirs.manifests())? {
        let entry = entry?;
        if entry.path() != mpath {
            std::fs::remove_file(entry.path())?;
        }
    }
    let previous = std::fs::read_link(dirs.current_config()).ok();
    let mut keep_configs = vec![applied.version];
    if let Some(d) = previous.and_then(|p| p.to_str().and_then(|s| s.parse().ok())) {
        keep_configs.push(d);
    }
    files::prune_configs(&dirs.config(), &keep_configs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(s: &str) -> StorePath {
        StorePath::new(&format!("/nix/store/{}-{s}", "a".repeat(32))).unwrap()
    }

    #[test]
    fn skip_decisions() {
        let v1 = Digest::of(b"1");
        let v2 = Digest::of(b"2");
        let mut s = State {
            applied: Some(Applied {
                version: v1,
                system: sp("one"),
                at: 0,
                created: None,
            }),
            ..Default::default()
        };
        assert!(is_up_to_date(&s, &v1, Some(&sp("one"))));
        // Someone switched to another system by hand: apply again.
        assert!(!is_up_to_date(&s, &v1, Some(&sp("other"))));
        assert!(!is_up_to_date(&s, &v2, Some(&sp("one"))));
        assert!(skip_reason(&s, &v2, false, 0).is_none());
        s.record_rollback(v2);
        assert!(skip_reason(&s, &v2, false, 0)
            .unwrap()
            .contains("rolled back"));
        assert!(skip_reason(&s, &v2, true, 0).is_none());
        let v3 = Digest::of(b"3");
        s.record_failure(v3, 1000);
        assert!(skip_reason(&s, &v3, false, 1100)
            .unwrap()
            .contains("retrying in"));
        assert!(skip_reason(&s, &v3, false, 1000 + 301).is_none());
    }
}
