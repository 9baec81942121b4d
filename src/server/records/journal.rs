//! The journal: one JSON line per publish, rollback, rollout step and hold change (when,
//! who, commit, hosts and their serials), appended and synced, never rewritten: the audit
//! trail an operator is asked for after an incident.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::manifest::Digest;
use crate::protocol::HostName;

/// One host's part of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalHost {
    pub host: HostName,
    /// `published`, `unchanged`, `failed`, `rolled back`, `held`, `released`.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// RFC 3339.
    pub time: String,
    /// The operator (`SUDO_USER`, else `USER`, else the uid).
    pub who: String,
    /// `publish`, `rollback`, `release`, `rollout step`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub hosts: Vec<JournalHost>,
}

#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    pub fn new(records: &Path) -> Self {
        Self {
            path: records.join("journal.jsonl"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an entry, synced before it returns.
    pub fn append(&self, entry: &Entry) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = self.path.parent() {
            super::private_dir(dir)?;
        }
        let mut line = serde_json::to_vec(entry).expect("entry serialises");
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()
    }

    /// Every entry, oldest first; a line that does not parse (a torn last write) is skipped
    /// and counted.
    pub fn read(&self) -> std::io::Result<(Vec<Entry>, usize)> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(e),
        };
        let mut bad = 0;
        let entries = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| serde_json::from_str(l).inspect_err(|_| bad += 1).ok())
            .collect();
        Ok((entries, bad))
    }
}

/// The versions `bento rollback` made live on `host`, from the journal (for `bento log`'s
/// KIND: a rollback's manifest is an earlier one's content and carries no mark of its own).
/// An unreadable journal only makes rollbacks show as publishes.
pub fn rolled_back(journal: &Journal, host: &HostName) -> std::collections::BTreeSet<Digest> {
    let Ok((entries, _)) = journal.read() else {
        return Default::default();
    };
    entries
        .iter()
        .filter(|e| e.action == "rollback")
        .flat_map(|e| &e.hosts)
        .filter(|h| h.host == *host && h.result == "rolled back")
        .filter_map(|h| h.version)
        .collect()
}

/// Who runs this command, for the journal.
pub fn operator() -> String {
    ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| format!("uid {}", crate::sys::accounts::euid()))
}
