//! What a host tells the server, in its `logs/`: a heartbeat on every run (seen, running
//! what) and a report for every run that tried to apply a version. Written by the agent,
//! read by `bento status`; the format is in docs/protocol.md.
//!
//! ```text
//! logs/heartbeat.json        overwritten by every run
//! logs/latest.json           the newest report (what `bento status` reads)
//! logs/reports/<id>.json     every report, named by its id (a sortable time + random part)
//! logs/reports/<id>.log.gz   the run's full log, gzip
//! ```

use serde::{Deserialize, Serialize};

use crate::protocol::manifest::Digest;
use crate::protocol::{HostName, Timestamp};

/// Report and heartbeat format written by this build.
pub const FORMAT: u32 = 1;
pub const HEARTBEAT_FILE: &str = "heartbeat.json";
pub const LATEST_FILE: &str = "latest.json";
pub const REPORTS_DIR: &str = "reports";
/// A report or heartbeat larger than this is not read (a host is not trusted by the server).
pub const MAX_REPORT_BYTES: u64 = 1024 * 1024;

/// How a run that tried to apply a version ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The version is applied and the server was reachable afterwards.
    Success,
    /// Fetching, building or activating failed; the running system was kept.
    Failure,
    /// Activated, then the server could not be reached or a health check failed: the
    /// previous system was restored.
    Rollback,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Rollback => "rollback",
        }
    }
}

/// What a run applied: a published version, or the applied version with its flake inputs
/// re-locked by the host itself (self-update).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RunKind {
    #[default]
    Published,
    AutoUpdated,
}

/// Milliseconds spent in each phase of a run (absent when the phase did not run).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activate_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_ms: Option<u64>,
    /// The health checks after the confirmation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks_ms: Option<u64>,
    pub total_ms: u64,
}

/// One run that tried to apply a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub format: u32,
    /// Unique and sortable by time: `YYYYMMDDTHHMMSSZ-<8 hex>`. Delivery is idempotent by id.
    pub id: String,
    pub host: HostName,
    /// `published` or `auto-updated`.
    #[serde(default)]
    pub kind: RunKind,
    /// The version (manifest digest) this run tried to apply.
    pub version: Digest,
    /// The version applied before this run, if any.
    pub previous_version: Option<Digest>,
    pub outcome: Outcome,
    /// The running system (store path) when the run started and when it ended.
    pub system_before: Option<String>,
    pub system_after: Option<String>,
    /// The system this version built to, when the build got that far.
    pub built_system: Option<String>,
    pub started: Timestamp,
    pub finished: Timestamp,
    pub timings: Timings,
    pub agent_version: String,
    /// One line saying what went wrong (failure, rollback).
    pub error: Option<String>,
    /// The last lines of the build and activation output.
    pub log_tail: String,
    /// Whether the kernel or initrd changed, so a reboot is needed to run the new one.
    #[serde(default)]
    pub reboot_required: bool,
    /// Every health check's result (the built-in one first), when they ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<crate::protocol::check::CheckResult>,
    /// The manifest's creation time was more than 5 minutes ahead of the agent's clock:
    /// one of the two clocks is wrong (what the agent logged at WARN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_warning: Option<String>,
    /// The server's clock minus this machine's, in seconds, when the agent corrected its
    /// requests' time by it (an object store refuses a signature from a skewed clock);
    /// absent when nothing was corrected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_s: Option<i64>,
}

/// Written by every run, including no-op runs: the host was seen, running this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub format: u32,
    pub host: HostName,
    /// RFC 3339 UTC.
    pub time: Timestamp,
    /// The version applied and running (None before the first successful apply).
    pub version: Option<Digest>,
    /// The running system's store path.
    pub system: Option<String>,
    /// The outcome of the newest report, and its id, so a reader needs only this file to know
    /// whether the last attempt failed.
    pub last_outcome: Option<Outcome>,
    pub last_report: Option<String>,
    pub agent_version: String,
    /// The applied system's kernel, initrd or modules differ from the booted ones.
    #[serde(default)]
    pub reboot_pending: bool,
    /// The running system is a self-update of `version` (its flake inputs re-locked).
    #[serde(default)]
    pub auto_updated: bool,
    /// When a run last ended in success (RFC 3339), whatever happened since.
    #[serde(default)]
    pub last_success: Option<Timestamp>,
    /// Whether the agent checks manifest signatures (it has `trusted_keys`). Absent in
    /// heartbeats of agents older than the field: unknown, not `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifies_signatures: Option<bool>,
    /// The applied version's `serial`: what the agent refuses to go below. The publisher
    /// numbers above it when its own records are gone (a restored server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<u64>,
    /// Set while the host finds its source stale (no freshness stamp that vouches for the
    /// live version, `[server] freshness`): why, in the agent's words. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale: Option<String>,
    /// As the report's `clock_offset_s`: the correction this run's requests were signed
    /// with, absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_s: Option<i64>,
    /// The manifest formats the agent reads (`[1, 2]`). Absent from agents older than
    /// format 2, which read format 1 only: `bento status` names them as what keeps a fleet
    /// from `[server] format = 2`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub formats: Vec<u32>,
}

impl Report {
    /// A success that activated the system the machine already ran (`unchanged (same
    /// system)` rather than `updated`: only files or settings, if anything, changed).
    pub fn same_system(&self) -> bool {
        self.outcome == Outcome::Success
            && self.system_before.is_some()
            && self.system_before == self.built_system
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("report serialises");
        v.push(b'\n');
        v
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// `reports/<id>.json`, relative to `logs/`.
    pub fn file_name(&self) -> String {
        format!("{REPORTS_DIR}/{}.json", self.id)
    }

    /// `reports/<id>.log.gz`, relative to `logs/`.
    pub fn log_file_name(&self) -> String {
        format!("{REPORTS_DIR}/{}.log.gz", self.id)
    }
}

impl Heartbeat {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("heartbeat serialises");
        v.push(b'\n');
        v
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A new report id for a run started at `started` (RFC 3339 is not file-name friendly).
pub fn new_id(started: std::time::SystemTime) -> String {
    let t = humantime::format_rfc3339_seconds(started).to_string();
    let compact: String = t.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let mut rnd = [0u8; 4];
    if getrandom(&mut rnd).is_err() {
        rnd = (std::process::id()).to_be_bytes();
    }
    format!("{compact}-{}", hex::encode(rnd))
}

/// True for a name of the shape [`new_id`] makes (`YYYYMMDDTHHMMSSZ-` and 8 lowercase hex
/// digits): the only names a reader of `logs/reports/` lists as runs, so a host-chosen file
/// name can never carry anything but digits, letters and one dash to a terminal.
pub fn is_report_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 25
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'T'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && b[15] == b'Z'
        && b[16] == b'-'
        && b[17..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time() {
        let id = new_id(std::time::SystemTime::now());
        assert!(is_report_id(&id), "{id}");
        for bad in [
            "20261125T120000Z-0a0b0c0",
            "20261125T120000Z-0A0B0C0D",
            "20261125T120000Z-0a0b0c0d.json",
            "2026112xT120000Z-0a0b0c0d",
            "\x1b[2J61125T120000Z-0a0b0c0d",
            "",
        ] {
            assert!(!is_report_id(bad), "{bad:?}");
        }
        let a = new_id(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000));
        let b = new_id(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_001));
        assert!(a < b, "{a} {b}");
        assert!(a.starts_with("20231114T221320Z-"), "{a}");
        assert_eq!(a.len(), "20231114T221320Z-".len() + 8);
    }

    #[test]
    fn report_round_trip() {
        let r = Report {
            format: FORMAT,
            id: "20261125T120000Z-0a0b0c0d".into(),
            host: HostName::new("alpha").unwrap(),
            kind: RunKind::Published,
            version: Digest::of(b"v"),
            previous_version: None,
            outcome: Outcome::Rollback,
            system_before: Some("/nix/store/a-sys".into()),
            system_after: Some("/nix/store/a-sys".into()),
            built_system: Some("/nix/store/b-sys".into()),
            started: "2026-11-25T12:00:00Z".parse().unwrap(),
            finished: "2026-11-25T12:01:00Z".parse().unwrap(),
            timings: Timings {
                total_ms: 60_000,
                ..Default::default()
            },
            agent_version: "0.1.0".into(),
            error: Some("server unreachable after activation".into()),
            log_tail: "…".into(),
            reboot_required: false,
            checks: Vec::new(),
            clock_warning: None,
            clock_offset_s: None,
        };
        let text = String::from_utf8(r.to_bytes()).unwrap();
        assert!(text.contains("\"outcome\": \"rollback\""), "{text}");
        assert!(!text.contains("clock_warning"), "absent unless set: {text}");
        assert_eq!(Report::parse(text.as_bytes()).unwrap(), r);
        assert!(!r.same_system(), "a rollback");

        // A success that built the system it ran: `unchanged (same system)`.
        let same = Report {
            outcome: Outcome::Success,
            built_system: r.system_before.clone(),
            clock_warning: Some("the manifest was created …".into()),
            ..r.clone()
        };
        assert!(same.same_system());
        let text = String::from_utf8(same.to_bytes()).unwrap();
        assert_eq!(Report::parse(text.as_bytes()).unwrap(), same);
        let other = Report {
            outcome: Outcome::Success,
            ..r
        };
        assert!(!other.same_system(), "it built another system");
    }
}
