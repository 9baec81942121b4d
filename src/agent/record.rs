//! Recording what a run did: the run's log, the report, the state file, the spool, delivery
//! to the server, the heartbeat, and the follow-ups (notification, reboot).
//!
//! Invariants: the state is saved before delivery, so the machine knows what it did whatever
//! happens to the report; a report is spooled before it is delivered and leaves the spool
//! only once the server has it (ids are unique, so delivering twice rewrites one file); a
//! report that cannot be spooled (a full disk) is delivered from memory, so the server still
//! learns that the host failed and why; a reboot waits until the report is on the server.

use std::io::Write as _;
use std::time::{Instant, SystemTime};

use super::apply::Attempt;
use super::host::Host;
use super::outcome::{secs, state_err, AgentError, AttemptError, RunLog, RunResult, UpdateOptions};
use super::source::{Connection, LogItem, RemoteError, Sink};
use super::state::{Applied, LastRun, State, StateDir};
use super::{config::AgentConfig, files};
use crate::protocol::manifest::{Digest, Manifest};
use crate::protocol::report::{self, Heartbeat, Outcome, Report, RunKind, Timings};
use crate::protocol::settings::{self, RebootAction};
use crate::protocol::{StorePath, Timestamp};

/// A run that tries something (a published version or a self-update) and ends in a report.
pub struct Run<'a> {
    pub log: RunLog<'a>,
    pub timings: Timings,
    started_at: SystemTime,
    clock: Instant,
    dirs: &'a StateDir,
    running: Option<StorePath>,
    kind: RunKind,
    /// The clock correction the run's first connection made (a later, fresh connection
    /// may not have made a request yet when the report is written).
    pub clock_offset: Option<i64>,
}

impl<'a> Run<'a> {
    pub fn start(
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
            clock_offset: None,
        }
    }

    /// The report of this run, as it ends now.
    fn report(
        &mut self,
        state: &State,
        attempt: &Attempt<'_>,
        outcome: Outcome,
        error: Option<&str>,
        finished: SystemTime,
        system_after: &Option<StorePath>,
    ) -> Report {
        self.timings.total_ms = self.clock.elapsed().as_millis() as u64;
        Report {
            format: report::FORMAT,
            id: report::new_id(self.started_at),
            host: attempt.cfg.host.clone(),
            kind: self.kind,
            version: attempt.version,
            previous_version: state.applied.as_ref().map(|a| a.version),
            outcome,
            system_before: self.running.as_ref().map(|p| p.to_string()),
            system_after: system_after.as_ref().map(|p| p.to_string()),
            built_system: attempt.built.as_ref().map(|p| p.to_string()),
            started: Timestamp::seconds(self.started_at),
            finished: Timestamp::seconds(finished),
            timings: self.timings.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            error: error.map(|e| e.lines().next().unwrap_or_default().to_owned()),
            log_tail: self.log.tail(),
            reboot_required: attempt.reboot_required,
            checks: attempt.checks.clone(),
            clock_warning: attempt.clock_warning.clone(),
            clock_offset_s: None,
        }
    }

    /// A server that stopped answering mid-run is worth a report (issue #14 item 4), but
    /// it cannot take one now: the report is spooled for the next run that reaches the
    /// server. The state is not touched (no back-off: it is not the version's fault).
    fn spool_stall(
        &mut self,
        opts: &UpdateOptions<'_>,
        state: &State,
        attempt: &Attempt<'_>,
        e: &RemoteError,
    ) {
        let finished = (opts.now)();
        let system_after = opts.host.running().ok().flatten();
        let error = e.to_string();
        let report = self.report(
            state,
            attempt,
            Outcome::Failure,
            Some(&error),
            finished,
            &system_after,
        );
        if let Err(e) = spool(self.dirs, &report, &self.log.text) {
            tracing::warn!("cannot spool report {} ({e}); it is lost", report.id);
        }
    }

    /// Records the outcome: state, spool, delivery, heartbeat, notification, reboot.
    pub fn finish(
        mut self,
        opts: &UpdateOptions<'_>,
        state: &mut State,
        conn: &mut Box<dyn Connection>,
        attempt: &Attempt<'_>,
        result: Result<Outcome, AttemptError>,
    ) -> Result<RunResult, AgentError> {
        let cfg = opts.config;
        let dirs = self.dirs;
        let (outcome, error) = match result {
            Ok(o) => (o, None),
            Err(AttemptError::Remote(e)) => {
                // Partial downloads resume on the next run.
                self.log.step(&format!("interrupted: {e}"));
                if e.is_stall() {
                    self.spool_stall(opts, state, attempt, &e);
                }
                return Err(AgentError::Remote(e));
            }
            Err(AttemptError::Failed(msg)) => (Outcome::Failure, Some(msg)),
            Err(AttemptError::RolledBack(msg)) => (Outcome::Rollback, Some(msg)),
        };
        match &error {
            Some(e) => self.log.warn(&format!("{}: {e}", outcome.as_str())),
            None if same_system(self.running.as_ref(), attempt) => self.log.step(&format!(
                "success: unchanged (same system): version {} runs the system this machine already ran",
                attempt.version.short()
            )),
            None => self.log.step("success"),
        }
        let finished = (opts.now)();
        let system_after = opts.host.running().ok().flatten();
        let effective = cfg.effective(attempt.settings.as_ref());
        // Never after a `test` activation: the reboot would run the old boot default.
        let reboot = settings::reboot_action(
            effective.reboot,
            &effective.reboot_at,
            outcome == Outcome::Success
                && attempt.reboot_required
                && effective.mode != crate::protocol::Mode::Test,
        );
        let mut report = self.report(
            state,
            attempt,
            outcome,
            error.as_deref(),
            finished,
            &system_after,
        );
        report.clock_offset_s = conn
            .clock_correction()
            .or(self.clock_offset)
            .filter(|o| *o != 0);

        record_in_state(state, attempt, self.kind, outcome, &report, secs(finished));
        // The report is spooled before the state records the run: a kill in between then
        // costs a second, truthful report (the next run re-applies and finds the build
        // running), never a lost one. A spool that cannot be written (a full disk) must not
        // silence the host: the report then goes to the server straight from memory.
        let spooled = spool(dirs, &report, &self.log.text);
        if let Err(e) = &spooled {
            tracing::warn!(
                "cannot spool report {} ({e}); delivering it from memory",
                report.id
            );
        }
        let saved = dirs.save(state);
        if outcome == Outcome::Success && saved.is_ok() {
            if let Err(e) = collect_cache(dirs, state) {
                tracing::warn!("cleaning the local cache: {e}");
            }
        }

        // Deliver over the connection still open (after a confirmation, the fresh one).
        // After a rollback for a lost server that connection is the one that could not be
        // confirmed: the report waits in the spool for the next run. A rollback for a failed
        // health check came after a confirmed connection, so its report goes now.
        let delivered = if outcome != Outcome::Rollback || attempt.confirmed {
            let mut ok = deliver_spool(conn.as_mut(), dirs);
            if spooled.is_err() {
                let log_gz = gzip(&self.log.text).ok();
                ok = send(
                    conn.as_mut(),
                    &report.id,
                    &report.to_bytes(),
                    log_gz.as_deref(),
                )
                .inspect_err(|e| tracing::warn!("report {} is lost: {e}", report.id))
                .is_ok();
            }
            heartbeat(conn.as_mut(), cfg, state, system_after.as_ref(), finished);
            ok
        } else {
            false
        };
        // A reboot waits for a delivered report and a saved state: either lost, and the
        // machine would come back not knowing what it did.
        let may_reboot = delivered && saved.is_ok();
        follow_up(
            opts.host,
            &effective.notify,
            &report,
            &reboot,
            may_reboot,
            &mut self.log,
        );
        // The server knows now; the run still fails for the state it could not keep.
        saved.map_err(state_err(&dirs.state_file()))?;
        Ok(match outcome {
            Outcome::Success => RunResult::Updated(Box::new(report)),
            Outcome::Failure => RunResult::Failed(Box::new(report)),
            Outcome::Rollback => RunResult::RolledBack(Box::new(report)),
        })
    }
}

/// The attempt built the very system this machine ran when the run started (issue #24
/// item 5): the version changed only files or settings, or nothing this host runs.
fn same_system(running: Option<&StorePath>, attempt: &Attempt<'_>) -> bool {
    attempt.built.is_some() && running == attempt.built.as_ref()
}

/// What the state keeps of a finished attempt.
fn record_in_state(
    state: &mut State,
    attempt: &Attempt<'_>,
    kind: RunKind,
    outcome: Outcome,
    report: &Report,
    finished: u64,
) {
    let version = attempt.version;
    state.installed_files = attempt.installed.clone();
    match (outcome, kind) {
        (Outcome::Success, _) => {
            let system = attempt.built.clone().expect("a success has a build");
            let (created, serial) = match kind {
                RunKind::Published => (attempt.created.clone(), attempt.serial),
                RunKind::AutoUpdated => state
                    .applied
                    .as_ref()
                    .map_or((None, None), |a| (a.created.clone(), a.serial)),
            };
            state.applied = Some(Applied {
                version,
                system,
                at: finished,
                created,
                serial,
            });
            state.auto_updated = kind == RunKind::AutoUpdated;
            state.last_success = Some(finished);
            state.failures = None;
            state.reboot_pending = state.reboot_pending || attempt.reboot_required;
        }
        (Outcome::Failure, RunKind::Published) => state.record_failure(version, finished),
        (Outcome::Rollback, RunKind::Published) => state.record_rollback(version),
        // A failed self-update is retried at the next self-update time, like any other.
        (_, RunKind::AutoUpdated) => {}
    }
    state.last = Some(LastRun {
        id: report.id.clone(),
        version,
        outcome,
        finished,
        error: report.error.clone(),
    });
}

/// After the report: tell a person about a failure, and reboot when the policy says so.
fn follow_up(
    host: &dyn Host,
    notify: &Option<Vec<String>>,
    report: &Report,
    reboot: &RebootAction,
    may_reboot: bool,
    log: &mut RunLog<'_>,
) {
    if report.outcome != Outcome::Success {
        if let Some(cmd) = notify {
            host.notify(cmd, &report.to_bytes());
        }
    }
    match reboot {
        RebootAction::None => {}
        // Only after the report is on the server: the reboot must not lose it.
        RebootAction::Now if may_reboot => host.reboot_now(&mut |line| log.step(line)),
        RebootAction::Now => tracing::warn!("reboot postponed: the report is not delivered yet"),
        RebootAction::At(when) => host.schedule_reboot(when),
    }
}

/// Writes the report (and its gzipped log) into the spool.
fn spool(dirs: &StateDir, report: &Report, log: &str) -> std::io::Result<()> {
    crate::sys::atomic::write_file(
        &dirs.spool().join(format!("{}.log.gz", report.id)),
        &gzip(log)?,
        0o600,
    )?;
    crate::sys::atomic::write_file(
        &dirs.spool().join(format!("{}.json", report.id)),
        &report.to_bytes(),
        0o600,
    )
}

fn gzip(text: &str) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes())?;
    gz.finish()
}

/// Delivers spooled reports, oldest first. A report leaves the spool only once the server
/// has it; delivering one twice writes the same file twice (ids are unique), never a copy.
pub fn deliver_spool(sink: &mut dyn Sink, dirs: &StateDir) -> bool {
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
        match send(sink, &report.id, &bytes, std::fs::read(&gz).ok().as_deref()) {
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

/// One report onto the server: its log first, so a reader that sees the report finds it.
fn send(
    sink: &mut dyn Sink,
    id: &str,
    json: &[u8],
    log_gz: Option<&[u8]>,
) -> Result<(), RemoteError> {
    if let Some(log) = log_gz {
        sink.put(LogItem::ReportLog(id), log)?;
    }
    sink.put(LogItem::Report(id), json)?;
    sink.put(LogItem::Latest, json)
}

pub fn heartbeat(
    sink: &mut dyn Sink,
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
        time: Timestamp::seconds(now),
        version,
        system: running.map(|p| p.to_string()),
        last_outcome: state.last.as_ref().map(|l| l.outcome),
        last_report: state.last.as_ref().map(|l| l.id.clone()),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        reboot_pending: state.reboot_pending,
        auto_updated: version.is_some() && state.auto_updated,
        last_success: state.last_success.map(Timestamp::from_unix),
        verifies_signatures: Some(!cfg.trusted_keys.is_empty()),
        serial: state.applied.as_ref().and_then(|a| a.serial),
        stale: state.stale.as_ref().map(|s| s.reason.clone()),
        clock_offset_s: sink.clock_correction().filter(|o| *o != 0),
        formats: crate::protocol::manifest::FORMATS.to_vec(),
    };
    if let Err(e) = sink.put(LogItem::Heartbeat, &hb.to_bytes()) {
        tracing::warn!("could not write the heartbeat: {e}");
    }
}

/// Keeps cached objects, manifests and configuration trees of the applied version only.
fn collect_cache(dirs: &StateDir, state: &State) -> std::io::Result<()> {
    let Some(applied) = &state.applied else {
        return Ok(());
    };
    let mpath = dirs.manifests().join(format!("{}.json", applied.version));
    let mut manifest = Manifest::parse(&std::fs::read(&mpath)?)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // Format 2: its trees are among the objects kept, so they are read from there.
    let objects = dirs.objects();
    manifest
        .expand(|d| {
            std::fs::read(objects.join(d.to_hex())).map_err(|e| {
                crate::protocol::tree::TreeError::Missing {
                    tree: *d,
                    reason: e.to_string(),
                }
            })
        })
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let keep: std::collections::BTreeSet<String> =
        manifest.host_objects().iter().map(Digest::to_hex).collect();
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
