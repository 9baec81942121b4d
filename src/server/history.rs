//! A host's past runs, from the reports it left in `logs/reports/` (`bento log`). Only this
//! module parses old reports: `bento status` reads `latest.json` and the heartbeat alone, so
//! a long history never slows it down.
//!
//! Everything here is host-written and untrusted: files are read through [`super::logs`]
//! (no links, bounded size), a report that does not parse is listed as unreadable rather
//! than failing the whole history, and the full log is decompressed with a size cap.

use std::io::Read as _;

use serde::Serialize;

use super::logs::LogsError;
use super::store::{Key, Store, SubPath};
use crate::protocol::check::CheckResult;
use crate::protocol::manifest::Digest;
use crate::protocol::report::{is_report_id, Outcome, Report, RunKind, REPORTS_DIR};
use crate::protocol::HostName;
use crate::sys::terminal;

/// Largest run log `full_log` decompresses (a host must not exhaust the server's memory).
pub const MAX_LOG_TEXT: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Logs(#[from] LogsError),
    #[error("no run {id:?} in {dir}")]
    NoSuchRun { id: String, dir: String },
    #[error("{path}: not a gzip log ({source})")]
    BadLog {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: larger than {max} bytes once decompressed")]
    LogTooLarge { path: String, max: u64 },
}

/// What started a run, as `bento log` names it: a version published by the server, one a
/// `bento rollback` made live, or the host re-locking its own flake inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Publish,
    Rollback,
    SelfUpdate,
}

impl Kind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Publish => "publish",
            Kind::Rollback => "rollback",
            Kind::SelfUpdate => "self-update",
        }
    }
}

/// One past run, as `bento log` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Run {
    pub id: String,
    /// When the run started (RFC 3339, as the host wrote it).
    pub time: Option<String>,
    pub outcome: Option<Outcome>,
    pub kind: Option<Kind>,
    pub version: Option<Digest>,
    pub duration_ms: Option<u64>,
    pub error: Option<String>,
    /// Whether `logs/reports/<id>.log.gz` is there to print.
    pub has_log: bool,
    /// Set when the report could not be read or parsed; the other fields are then empty.
    pub unreadable: Option<String>,
    /// The report's health-check results, as it carries them; always present, empty when the
    /// run ran none (or the report is unreadable).
    pub checks: Vec<CheckResult>,
    /// A success that activated the system the host already ran (`unchanged (same system)`).
    pub same_system: bool,
}

/// A host's runs and what else it left in `logs/reports/`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// The newest runs, newest first.
    pub runs: Vec<Run>,
    /// Names in `logs/reports/` that are neither `<id>.json` nor `<id>.log.gz` for a report
    /// id: escaped for a terminal and cut short, since the host chose them.
    pub unexpected: Vec<String>,
}

/// The longest unexpected name shown (a host is not trusted to be brief).
const MAX_UNEXPECTED_CHARS: usize = 80;

/// The newest `limit` runs of `host`, newest first; a published run of one of `rollbacks`
/// (`server::records::rolled_back`, from the journal) is a rollback.
pub fn runs(
    store: &dyn Store,
    host: &HostName,
    limit: usize,
    rollbacks: &std::collections::BTreeSet<Digest>,
) -> Result<Vec<Run>, HistoryError> {
    history(store, host, limit, rollbacks).map(|h| h.runs)
}

/// The newest `limit` runs of `host`, newest first, and every entry that is not a run's
/// file. Newest by when the server received each report (its modification time, by the
/// server's clock), then by id: a host's ids carry its own clock, which may be hours off
/// (issue #24 item 6). Only names of the report-id shape are runs, so no host-chosen text
/// other than an id (digits, `T`, `Z`, a dash, hex) ever stands in the ID column.
pub fn history(
    store: &dyn Store,
    host: &HostName,
    limit: usize,
    rollbacks: &std::collections::BTreeSet<Digest>,
) -> Result<History, HistoryError> {
    let entries = match store.list_logs(host, Some(REPORTS_DIR)) {
        Ok(e) => e,
        // A host that never reported has no reports/ yet: no history, not an error.
        Err(LogsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(History::default())
        }
        Err(e) => return Err(e.into()),
    };
    let names: std::collections::BTreeSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    let mut out = History::default();
    let mut reports = Vec::new();
    for entry in &entries {
        let name = entry.name.as_str();
        let id = name
            .strip_suffix(".json")
            .or_else(|| name.strip_suffix(".log.gz"))
            .filter(|id| is_report_id(id));
        match id {
            None => {
                let shown = terminal::truncate(name, MAX_UNEXPECTED_CHARS);
                out.unexpected.push(terminal::escape(&shown).into_owned());
            }
            Some(id) if name.ends_with(".json") => reports.push((entry, id)),
            Some(_) => {}
        }
    }
    reports.sort_by(|(a, _), (b, _)| a.modified.cmp(&b.modified).then(a.name.cmp(&b.name)));
    for (_, id) in reports.into_iter().rev().take(limit) {
        let has_log = names.contains(format!("{id}.log.gz").as_str());
        let mut run = run_of(store, host, id, has_log);
        if run.kind == Some(Kind::Publish) && run.version.is_some_and(|v| rollbacks.contains(&v)) {
            run.kind = Some(Kind::Rollback);
        }
        out.runs.push(run);
    }
    Ok(out)
}

fn run_of(store: &dyn Store, host: &HostName, id: &str, has_log: bool) -> Run {
    let empty = |why: String| Run {
        id: id.to_owned(),
        time: None,
        outcome: None,
        kind: None,
        version: None,
        duration_ms: None,
        error: None,
        has_log,
        unreadable: Some(why),
        checks: Vec::new(),
        same_system: false,
    };
    let bytes = match store.read_log(host, Some(REPORTS_DIR), &format!("{id}.json")) {
        Ok(b) => b,
        Err(e) => return empty(e.to_string()),
    };
    match Report::parse(&bytes) {
        Ok(r) if r.id == id => Run {
            same_system: r.same_system(),
            id: r.id,
            time: Some(r.started.to_string()),
            outcome: Some(r.outcome),
            kind: Some(match r.kind {
                RunKind::Published => Kind::Publish,
                RunKind::AutoUpdated => Kind::SelfUpdate,
            }),
            version: Some(r.version),
            duration_ms: Some(r.timings.total_ms),
            error: r.error,
            has_log,
            unreadable: None,
            checks: r.checks,
        },
        Ok(r) => empty(format!("the report inside says it is run {:?}", r.id)),
        Err(e) => empty(format!("not a report: {e}")),
    }
}

/// The full log of run `id`, decompressed.
pub fn full_log(store: &dyn Store, host: &HostName, id: &str) -> Result<String, HistoryError> {
    let name = format!("{id}.log.gz");
    let dir = || {
        let reports = Key::Log(SubPath::new(REPORTS_DIR).expect("a plain name"));
        store.locate(host, &reports).display().to_string()
    };
    let shown = || format!("{}/{name}", dir());
    let gz = match store.read_log(host, Some(REPORTS_DIR), &name) {
        Ok(b) => b,
        Err(LogsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(HistoryError::NoSuchRun {
                id: id.to_owned(),
                dir: dir(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .take(MAX_LOG_TEXT + 1)
        .read_to_end(&mut text)
        .map_err(|source| HistoryError::BadLog {
            path: shown(),
            source,
        })?;
    if text.len() as u64 > MAX_LOG_TEXT {
        return Err(HistoryError::LogTooLarge {
            path: shown(),
            max: MAX_LOG_TEXT,
        });
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::protocol::report::{Timings, FORMAT};
    use crate::protocol::HostName;

    fn report(id: &str, outcome: Outcome, error: Option<&str>) -> Report {
        Report {
            format: FORMAT,
            id: id.into(),
            host: HostName::new("alpha").unwrap(),
            kind: RunKind::Published,
            version: Digest::of(id.as_bytes()),
            previous_version: None,
            outcome,
            system_before: None,
            system_after: None,
            built_system: None,
            started: "2026-11-25T12:00:00Z".parse().unwrap(),
            finished: "2026-11-25T12:01:00Z".parse().unwrap(),
            timings: Timings {
                total_ms: 1500,
                ..Default::default()
            },
            agent_version: "0.1.0".into(),
            error: error.map(str::to_owned),
            log_tail: String::new(),
            reboot_required: false,
            checks: Vec::new(),
            clock_warning: None,
            clock_offset_s: None,
        }
    }

    /// A chroot in `t` with host `alpha`'s directory; the paths below are `t/alpha/…`.
    fn store(t: &tempfile::TempDir) -> crate::server::store::ChrootStore {
        crate::server::store::ChrootStore::new(
            crate::protocol::layout::Chroot::new(t.path()),
            crate::server::chroot::Ownership::Leave,
        )
    }

    fn alpha() -> HostName {
        HostName::new("alpha").unwrap()
    }

    fn host_with(reports: &[Report]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("alpha/logs").join(REPORTS_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        for r in reports {
            std::fs::write(
                t.path().join("alpha/logs").join(r.file_name()),
                r.to_bytes(),
            )
            .unwrap();
        }
        t
    }

    #[test]
    fn newest_first_and_limited() {
        let t = host_with(&[
            report("20261125T100000Z-00000001", Outcome::Success, None),
            report(
                "20261125T110000Z-00000002",
                Outcome::Failure,
                Some("build failed"),
            ),
            report(
                "20261125T120000Z-00000003",
                Outcome::Rollback,
                Some("unreachable"),
            ),
        ]);
        let runs = runs(&store(&t), &alpha(), 2, &Default::default()).unwrap();
        let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["20261125T120000Z-00000003", "20261125T110000Z-00000002"]
        );
        assert_eq!(runs[1].outcome, Some(Outcome::Failure));
        assert_eq!(runs[1].error.as_deref(), Some("build failed"));
        assert_eq!(runs[0].duration_ms, Some(1500));
    }

    #[test]
    fn each_run_says_what_started_it() {
        let mut auto = report("20261125T120000Z-00000003", Outcome::Success, None);
        auto.kind = RunKind::AutoUpdated;
        let rolled = report("20261125T110000Z-00000002", Outcome::Success, None);
        let t = host_with(&[
            report("20261125T100000Z-00000001", Outcome::Success, None),
            rolled.clone(),
            auto,
        ]);
        let rollbacks = [rolled.version].into_iter().collect();
        let kinds: Vec<Option<Kind>> = runs(&store(&t), &alpha(), 10, &rollbacks)
            .unwrap()
            .iter()
            .map(|r| r.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                Some(Kind::SelfUpdate),
                Some(Kind::Rollback),
                Some(Kind::Publish)
            ]
        );
        let json =
            serde_json::to_value(runs(&store(&t), &alpha(), 1, &rollbacks).unwrap()).unwrap();
        assert_eq!(json[0]["kind"], "self-update");
    }

    #[test]
    fn runs_are_ordered_by_when_the_server_received_them() {
        // A host whose clock ran 3 h ahead named its older run after the later time.
        let t = host_with(&[
            report("20261125T150000Z-00000001", Outcome::Success, None),
            report("20261125T120500Z-00000002", Outcome::Failure, Some("x")),
        ]);
        let dir = t.path().join("alpha/logs").join(REPORTS_DIR);
        let at = |secs| std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        for (name, secs) in [
            ("20261125T150000Z-00000001.json", 1_000),
            ("20261125T120500Z-00000002.json", 2_000),
        ] {
            std::fs::File::options()
                .write(true)
                .open(dir.join(name))
                .unwrap()
                .set_modified(at(secs))
                .unwrap();
        }
        let ids: Vec<String> = runs(&store(&t), &alpha(), 5, &Default::default())
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(
            ids,
            ["20261125T120500Z-00000002", "20261125T150000Z-00000001"],
            "received last, listed first"
        );
    }

    #[test]
    fn a_bad_report_is_listed_unreadable_not_fatal() {
        let t = host_with(&[report("20261125T100000Z-00000001", Outcome::Success, None)]);
        let dir = t.path().join("alpha/logs").join(REPORTS_DIR);
        std::fs::write(dir.join("20261125T110000Z-0000000f.json"), b"{not json").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", dir.join("20261125T120000Z-0000000e.json"))
            .unwrap();
        let runs = runs(&store(&t), &alpha(), 10, &Default::default()).unwrap();
        assert_eq!(runs.len(), 3);
        assert!(runs[0]
            .unreadable
            .as_deref()
            .unwrap()
            .contains("symbolic link"));
        assert!(runs[1]
            .unreadable
            .as_deref()
            .unwrap()
            .contains("not a report"));
        assert_eq!(runs[2].outcome, Some(Outcome::Success));
    }

    #[test]
    fn only_report_ids_are_runs_and_other_names_come_back_escaped() {
        let t = host_with(&[report("20261125T100000Z-00000001", Outcome::Success, None)]);
        let dir = t.path().join("alpha/logs").join(REPORTS_DIR);
        std::fs::write(dir.join("\x1b[2J\x1b]0;owned\x07.json"), b"{}").unwrap();
        std::fs::write(dir.join("20261125T100000Z-00000001.log.gz"), b"").unwrap();
        std::fs::write(dir.join("notes.txt"), b"").unwrap();
        let h = history(&store(&t), &alpha(), 10, &Default::default()).unwrap();
        let ids: Vec<&str> = h.runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["20261125T100000Z-00000001"]);
        assert!(h.runs[0].has_log);
        assert_eq!(
            h.unexpected,
            ["\\u{1b}[2J\\u{1b}]0;owned\\u{7}.json", "notes.txt"]
        );
    }

    #[test]
    fn no_reports_is_an_empty_history() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("alpha/logs")).unwrap();
        assert!(runs(&store(&t), &alpha(), 10, &Default::default())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_linked_reports_dir_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("alpha/logs")).unwrap();
        std::os::unix::fs::symlink(other.path(), t.path().join("alpha/logs").join(REPORTS_DIR))
            .unwrap();
        assert!(matches!(
            runs(&store(&t), &alpha(), 10, &Default::default()),
            Err(HistoryError::Logs(LogsError::Refused { .. }))
        ));
    }

    #[test]
    fn full_log_is_decompressed_and_a_missing_one_named() {
        let t = host_with(&[]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"fetching\nbuilding\n").unwrap();
        let path = t
            .path()
            .join("alpha/logs")
            .join(REPORTS_DIR)
            .join("r1.log.gz");
        std::fs::write(path, gz.finish().unwrap()).unwrap();
        assert_eq!(
            full_log(&store(&t), &alpha(), "r1").unwrap(),
            "fetching\nbuilding\n"
        );
        let err = full_log(&store(&t), &alpha(), "r2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no run \"r2\""), "{err}");
        assert!(matches!(
            full_log(&store(&t), &alpha(), "../x"),
            Err(HistoryError::Logs(LogsError::BadName { .. }))
        ));
    }
}
