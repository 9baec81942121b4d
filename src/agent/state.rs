//! The agent's state directory: what is applied, what failed, what was rolled back, which
//! files were installed, plus the local object cache, staged configurations and the report
//! spool. `state.json` is replaced atomically, so a crash leaves the old state or the new.
//!
//! ```text
//! <state_dir>/
//!   lock                 held by a running `bento agent update`
//!   state.json           State
//!   objects/<sha256>     object cache (verified); objects/.partial-<sha256> resumes downloads
//!   manifests/<digest>.json
//!   config/<digest>/     a complete configuration tree; config/current -> <digest>
//!   spool/<id>.json      reports not yet delivered (+ <id>.log.gz)
//!   ssh/                 OpenSSH control sockets
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::manifest::Digest;
use crate::protocol::report::Outcome;
use crate::protocol::{StorePath, Timestamp};

/// How many rolled-back versions are remembered (each is never retried automatically).
const ROLLED_BACK_MEMORY: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub version: Digest,
    pub system: StorePath,
    /// Unix seconds.
    pub at: u64,
    /// The applied manifest's `created` time: an older manifest is a replay and is refused.
    #[serde(default, deserialize_with = "lenient_time")]
    pub created: Option<Timestamp>,
    /// The applied manifest's `serial` (replay protection without clocks); absent for a
    /// manifest from before serials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<u64>,
}

/// A state file written before times were checked may hold any text: an unreadable time
/// cannot prove a replay, so it reads as none rather than making the state unreadable.
fn lenient_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    Ok(text.and_then(|t| Timestamp::parse(&t).ok()))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRun {
    pub id: String,
    pub version: Digest,
    pub outcome: Outcome,
    /// Unix seconds.
    pub finished: u64,
    pub error: Option<String>,
}

/// Consecutive failures to apply one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failures {
    pub version: Digest,
    pub count: u32,
    /// Unix seconds of the latest failure.
    pub last: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub applied: Option<Applied>,
    pub last: Option<LastRun>,
    pub failures: Option<Failures>,
    #[serde(default)]
    pub rolled_back: Vec<Digest>,
    /// Targets (absolute, before `files_root`) installed by the applied version.
    #[serde(default)]
    pub installed_files: Vec<String>,
    /// The applied system's kernel or initrd differs from the booted one's.
    #[serde(default)]
    pub reboot_pending: bool,
    /// The applied system came from a self-update, not from the published lock file.
    #[serde(default)]
    pub auto_updated: bool,
    /// Unix seconds of the last self-update attempt.
    #[serde(default)]
    pub self_update_at: Option<u64>,
    /// Unix seconds of the last run that ended in success.
    #[serde(default)]
    pub last_success: Option<u64>,
    /// Set while runs cannot reach the server (no connection, or it dropped before the run
    /// could finish); cleared by the next run that reads `current`.
    #[serde(default)]
    pub unreachable: Option<Unreachable>,
    /// The last freshness stamp accepted for the live version (`agent::fresh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fresh: Option<super::fresh::Seen>,
    /// Set while the source is stale (its stamp ran out, was refused or is missing);
    /// cleared by the next run that finds it fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale: Option<Stale>,
}

/// Runs that found the source stale, since the last that did not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stale {
    /// Unix seconds of the first run of this streak.
    pub since: u64,
    /// Why, as the newest run saw it.
    pub reason: String,
}

/// Runs that could not reach the server, since the last one that did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreachable {
    /// Unix seconds of the first failed run of this streak.
    pub since: u64,
    /// Unix seconds of the newest failed run.
    pub at: u64,
    /// How many runs in a row failed to reach it.
    pub runs: u32,
    /// What the newest one said.
    pub error: String,
}

/// How long to wait before retrying a version that failed `count` times in a row:
/// 5 minutes, doubling, at most 6 hours.
pub fn retry_delay(count: u32) -> Duration {
    let base = 5 * 60u64;
    let secs = base.saturating_mul(1u64 << count.saturating_sub(1).min(16));
    Duration::from_secs(secs.min(6 * 3600))
}

impl State {
    /// When a failed version may be tried again (unix seconds), if it failed before.
    pub fn retry_at(&self, version: &Digest) -> Option<u64> {
        self.failures
            .as_ref()
            .filter(|f| &f.version == version)
            .map(|f| f.last + retry_delay(f.count).as_secs())
    }

    pub fn record_failure(&mut self, version: Digest, now: u64) {
        match &mut self.failures {
            Some(f) if f.version == version => {
                f.count += 1;
                f.last = now;
            }
            _ => {
                self.failures = Some(Failures {
                    version,
                    count: 1,
                    last: now,
                })
            }
        }
    }

    /// Records a run that could not reach the server at `now` (unix seconds).
    pub fn record_unreachable(&mut self, error: String, now: u64) {
        let (since, runs) = match &self.unreachable {
            Some(u) => (u.since, u.runs.saturating_add(1)),
            None => (now, 1),
        };
        self.unreachable = Some(Unreachable {
            since,
            at: now,
            runs,
            error,
        });
    }

    /// Records a run that found the source stale at `now` (unix seconds).
    pub fn record_stale(&mut self, reason: String, now: u64) {
        let since = self.stale.as_ref().map_or(now, |s| s.since);
        self.stale = Some(Stale { since, reason });
    }

    pub fn record_rollback(&mut self, version: Digest) {
        if !self.rolled_back.contains(&version) {
            self.rolled_back.push(version);
        }
        let excess = self.rolled_back.len().saturating_sub(ROLLED_BACK_MEMORY);
        self.rolled_back.drain(..excess);
    }
}

/// Paths inside the state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }
    pub fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }
    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }
    pub fn objects(&self) -> PathBuf {
        self.root.join("objects")
    }
    pub fn manifests(&self) -> PathBuf {
        self.root.join("manifests")
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config")
    }
    pub fn current_config(&self) -> PathBuf {
        self.config().join("current")
    }
    pub fn spool(&self) -> PathBuf {
        self.root.join("spool")
    }
    pub fn ssh(&self) -> PathBuf {
        self.root.join("ssh")
    }
    /// The local file binary cache a prebuilt system's missing NARs are fetched into.
    pub fn nix_cache(&self) -> PathBuf {
        self.root.join("nix-cache")
    }

    /// Creates the directories (root-only: the state may describe secrets' paths).
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [
            self.root.clone(),
            self.objects(),
            self.manifests(),
            self.config(),
            self.spool(),
            self.ssh(),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)?;
        }
        Ok(())
    }

    /// Removes what a killed run left behind: temporary files and half-staged trees.
    pub fn remove_leftovers(&self) {
        for dir in [self.root.clone(), self.spool(), self.manifests()] {
            let _ = crate::sys::atomic::remove_stale_temps(&dir);
        }
        if let Ok(entries) = std::fs::read_dir(self.config()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".staging-") || name == ".self-update" || name == ".current-tmp"
                {
                    let _ = std::fs::remove_dir_all(e.path())
                        .or_else(|_| std::fs::remove_file(e.path()));
                }
            }
        }
    }

    pub fn load(&self) -> std::io::Result<State> {
        match std::fs::read(self.state_file()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.state_file().display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, state: &State) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).expect("state serialises");
        crate::sys::atomic::write_file(&self.state_file(), &bytes, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(retry_delay(1), Duration::from_secs(300));
        assert_eq!(retry_delay(2), Duration::from_secs(600));
        assert_eq!(retry_delay(3), Duration::from_secs(1200));
        assert_eq!(retry_delay(40), Duration::from_secs(6 * 3600));
    }

    #[test]
    fn failures_count_per_version() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let mut s = State::default();
        s.record_failure(a, 100);
        s.record_failure(a, 200);
        assert_eq!(s.retry_at(&a), Some(200 + 600));
        assert_eq!(s.retry_at(&b), None);
        s.record_failure(b, 300);
        assert_eq!(s.failures.as_ref().unwrap().count, 1);
    }

    #[test]
    fn state_round_trips() {
        let t = tempfile::tempdir().unwrap();
        let dir = StateDir::new(t.path());
        dir.create().unwrap();
        assert_eq!(dir.load().unwrap(), State::default());
        let mut s = State::default();
        s.record_rollback(Digest::of(b"x"));
        dir.save(&s).unwrap();
        assert_eq!(dir.load().unwrap(), s);
    }
}
