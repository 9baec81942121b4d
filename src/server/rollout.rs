//! Rollouts in waves: `[rollout] waves` (or `--waves`) planned into disjoint host lists, and
//! a rollout's progress kept in the server's private state (`<chroot>/.bento/rollout.json`),
//! so `bento rollout --resume` continues at the wave it stopped at and `bento status` can
//! say which hosts a rollout holds back. The plan is fixed when the rollout starts: a
//! percentage picks the same hosts on resume even if the fleet changed since.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::protocol::layout::Chroot;
use crate::protocol::HostName;
use crate::server::select::{self, SelectError, Selector, Tags};
use crate::server::status::{HostStatus, State};
use crate::server::targets;
use crate::sys::atomic;

pub use crate::server::select::RolloutConfig;

pub const STATE_FILE: &str = "rollout.json";
pub const LOCK_FILE: &str = "rollout.lock";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("no waves: set [rollout] waves in bento.toml (e.g. [\"@canary\", \"25%\", \"100%\"]) or pass --waves")]
    NoWaves,
    #[error("wave {wave} ({selector}): {source}")]
    Select {
        wave: usize,
        selector: String,
        source: SelectError,
    },
    #[error("{} in no wave: end the waves with \"100%\" (or select fewer hosts with --on)", list(.0))]
    Uncovered(Vec<HostName>),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a rollout's progress ({message}); `bento rollout` without --resume starts a new rollout and replaces it (or remove the file)")]
    Corrupt { path: PathBuf, message: String },
}

fn list(hosts: &[HostName]) -> String {
    let names: Vec<&str> = hosts.iter().map(HostName::as_str).collect();
    let s = if hosts.len() == 1 { "host" } else { "hosts" };
    format!(
        "{s} {} {}",
        names.join(", "),
        if hosts.len() == 1 { "is" } else { "are" }
    )
}

/// One wave: its selector and the hosts it adds (those no earlier wave had).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    pub selector: String,
    pub hosts: Vec<HostName>,
}

/// Plans the waves over `universe` (the selected hosts, held ones already left out). Every
/// wave's selector must match a host of the universe, and every host must be in a wave.
pub fn plan(
    waves: &[Selector],
    universe: &[HostName],
    tags: &Tags,
) -> Result<Vec<Wave>, RolloutError> {
    if waves.is_empty() {
        return Err(RolloutError::NoWaves);
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, s) in waves.iter().enumerate() {
        let matched =
            select::resolve(std::slice::from_ref(s), universe, tags).map_err(|source| {
                RolloutError::Select {
                    wave: i + 1,
                    selector: s.to_string(),
                    source,
                }
            })?;
        let hosts: Vec<HostName> = matched
            .into_iter()
            .filter(|h| seen.insert(h.clone()))
            .collect();
        out.push(Wave {
            selector: s.to_string(),
            hosts,
        });
    }
    let left: Vec<HostName> = universe
        .iter()
        .filter(|h| !seen.contains(*h))
        .cloned()
        .collect();
    if !left.is_empty() {
        return Err(RolloutError::Uncovered(left));
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Publishing or waiting on `wave` (or interrupted while doing so).
    Running,
    /// Stopped at `wave` by a failure, a rollback or silence.
    Halted,
    Done,
}

/// Why a rollout halted, and the hosts that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Halt {
    pub reason: String,
    pub hosts: Vec<HostName>,
}

/// A rollout's progress, kept in `<chroot>/.bento/rollout.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub format: u32,
    /// When the rollout started (RFC 3339).
    pub started: String,
    pub waves: Vec<Wave>,
    /// The wave being rolled out, or halted at (0-based; `waves.len()` when done).
    pub wave: usize,
    pub phase: Phase,
    pub halt: Option<Halt>,
}

impl Progress {
    pub fn new(started: String, waves: Vec<Wave>) -> Self {
        Self {
            format: FORMAT,
            started,
            waves,
            wave: 0,
            phase: Phase::Running,
            halt: None,
        }
    }

    /// What every reader of a loaded progress relies on: a known format, and a wave that
    /// exists unless the rollout is done (a resume indexes `waves[wave]`).
    fn check(&self) -> Result<(), String> {
        let n = self.waves.len();
        if self.format != FORMAT {
            return Err(format!("format {}, this bento reads {FORMAT}", self.format));
        }
        match self.phase {
            Phase::Done if self.wave != n => Err(format!("done at wave {} of {n}", self.wave)),
            Phase::Running | Phase::Halted if self.wave >= n => {
                Err(format!("at wave {} of {n}", self.wave + 1))
            }
            _ => Ok(()),
        }
    }

    /// The hosts of waves `0..=k`: what wave `k` publishes (earlier waves again, which is a
    /// no-op for them unless the tree changed, e.g. a fix made before `--resume`).
    pub fn through(&self, k: usize) -> Vec<HostName> {
        self.waves
            .iter()
            .take(k + 1)
            .flat_map(|w| w.hosts.iter().cloned())
            .collect()
    }

    /// Hosts the rollout has not reached yet, with a note for `bento status`.
    pub fn held_back(&self) -> BTreeMap<HostName, String> {
        let mut out = BTreeMap::new();
        if self.phase == Phase::Done {
            return out;
        }
        let n = self.waves.len();
        let why = match self.phase {
            Phase::Halted => format!("halted at wave {}/{n}", self.wave + 1),
            _ => format!("at wave {}/{n}", self.wave + 1),
        };
        for (i, w) in self.waves.iter().enumerate().skip(self.wave + 1) {
            for h in &w.hosts {
                out.insert(
                    h.clone(),
                    format!(
                        "held back by the rollout ({why}; this host is in wave {}/{n}, {})",
                        i + 1,
                        w.selector
                    ),
                );
            }
        }
        out
    }
}

pub fn state_path(chroot: &Chroot) -> PathBuf {
    chroot.state_dir().join(STATE_FILE)
}

pub fn lock_path(chroot: &Chroot) -> PathBuf {
    chroot.state_dir().join(LOCK_FILE)
}

/// The last rollout's progress, if any.
pub fn load(chroot: &Chroot) -> Result<Option<Progress>, RolloutError> {
    let path = state_path(chroot);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RolloutError::Io { path, source }),
    };
    let p: Progress = serde_json::from_slice(&bytes).map_err(|e| RolloutError::Corrupt {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if let Err(message) = p.check() {
        return Err(RolloutError::Corrupt { path, message });
    }
    Ok(Some(p))
}

/// Writes the progress atomically (root-only, like the rest of `.bento/`).
pub fn save(chroot: &Chroot, progress: &Progress) -> Result<(), RolloutError> {
    let path = state_path(chroot);
    let mut bytes = serde_json::to_vec_pretty(progress).expect("progress serialises");
    bytes.push(b'\n');
    atomic::write_file(&path, &bytes, 0o600).map_err(|source| RolloutError::Io { path, source })
}

/// What `bento status` adds to each row: the host's tags, and why a rollout holds it back.
#[derive(Debug, Clone, Serialize)]
pub struct Annotated<'a> {
    #[serde(flatten)]
    pub row: &'a HostStatus,
    pub tags: Vec<String>,
    pub held_back: Option<String>,
}

/// The rollout's view of `bento status`: held hosts, tags, hosts a rollout holds back.
#[derive(Debug, Clone, Default)]
pub struct StatusView {
    held: BTreeSet<HostName>,
    tags: Tags,
    back: BTreeMap<HostName, String>,
}

impl StatusView {
    pub fn new(config: &crate::server::fleet::FleetConfig, progress: Option<&Progress>) -> Self {
        Self {
            held: targets::held(config),
            tags: targets::tags(config),
            back: progress.map(Progress::held_back).unwrap_or_default(),
        }
    }

    /// Marks held hosts (`hold = true`) as `held` unless they need a person (failing,
    /// rolled back, silent), and notes the hosts a rollout holds back in the error column.
    /// Rows are sorted again.
    pub fn apply(&self, rows: &mut [HostStatus]) {
        for row in rows.iter_mut() {
            if self.held.contains(&row.host) && !row.state.is_alarm() {
                row.state = State::Held;
                row.error = Some(join(row.error.take(), "hold = true in bento.toml"));
            }
            if let Some(note) = self.back.get(&row.host) {
                row.error = Some(join(row.error.take(), note));
            }
        }
        crate::server::status::collect::sort(rows);
    }

    /// The `--json` rows: each status row with `tags` and `held_back`.
    pub fn json<'a>(&self, rows: &'a [HostStatus]) -> Vec<Annotated<'a>> {
        rows.iter()
            .map(|row| Annotated {
                row,
                tags: self
                    .tags
                    .get(&row.host)
                    .map(|ts| ts.iter().map(|t| t.to_string()).collect())
                    .unwrap_or_default(),
                held_back: self.back.get(&row.host).cloned(),
            })
            .collect()
    }
}

fn join(first: Option<String>, second: &str) -> String {
    match first {
        Some(f) if !f.is_empty() => format!("{f}; {second}"),
        _ => second.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::select::Tag;

    fn h(n: &str) -> HostName {
        HostName::new(n).unwrap()
    }
    fn sels(s: &[&str]) -> Vec<Selector> {
        s.iter().map(|x| x.parse().unwrap()).collect()
    }

    fn fleet() -> (Vec<HostName>, Tags) {
        let all: Vec<HostName> = (0..8).map(|i| h(&format!("web-{i}"))).collect();
        let mut tags = Tags::new();
        tags.insert(h("web-3"), vec![Tag::new("canary").unwrap()]);
        (all, tags)
    }

    #[test]
    fn waves_are_disjoint_cumulative_and_cover_every_host() {
        let (all, tags) = fleet();
        let waves = plan(&sels(&["@canary", "25%", "100%"]), &all, &tags).unwrap();
        assert_eq!(waves.len(), 3);
        assert_eq!(waves[0].hosts, vec![h("web-3")]);
        // 25% of 8 is 2 hosts; the canary may be one of them, so the wave adds 1 or 2.
        let quarter = select::percent(&all, 25);
        let expected: Vec<HostName> = all
            .iter()
            .filter(|x| quarter.contains(*x) && x.as_str() != "web-3")
            .cloned()
            .collect();
        assert_eq!(waves[1].hosts, expected);
        let total: usize = waves.iter().map(|w| w.hosts.len()).sum();
        assert_eq!(total, 8);
        let p = Progress::new("t".into(), waves.clone());
        assert_eq!(p.through(0), vec![h("web-3")]);
        assert_eq!(p.through(2).len(), 8);
        // Planning again gives the same waves.
        assert_eq!(
            plan(&sels(&["@canary", "25%", "100%"]), &all, &tags).unwrap(),
            waves
        );
    }

    #[test]
    fn a_wave_matching_nothing_or_hosts_left_over_are_errors() {
        let (all, tags) = fleet();
        let err = plan(&sels(&["@lab", "100%"]), &all, &tags)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "wave 1 (@lab): selector @lab matches no host");
        let err = plan(&sels(&["@canary", "50%"]), &all, &tags)
            .unwrap_err()
            .to_string();
        assert!(err.contains("in no wave") && err.contains("100%"), "{err}");
        assert!(matches!(plan(&[], &all, &tags), Err(RolloutError::NoWaves)));
    }

    #[test]
    fn held_back_hosts_are_the_later_waves() {
        let (all, tags) = fleet();
        let waves = plan(&sels(&["@canary", "100%"]), &all, &tags).unwrap();
        let mut p = Progress::new("t".into(), waves);
        let back = p.held_back();
        assert_eq!(back.len(), 7);
        assert!(!back.contains_key(&h("web-3")));
        assert!(
            back[&h("web-0")].contains("at wave 1/2"),
            "{}",
            back[&h("web-0")]
        );
        p.phase = Phase::Halted;
        assert!(p.held_back()[&h("web-0")].contains("halted at wave 1/2"));
        p.wave = 1;
        assert!(p.held_back().is_empty());
        p.wave = 2;
        p.phase = Phase::Done;
        assert!(p.held_back().is_empty());
    }

    #[test]
    fn progress_round_trips_through_the_state_file() {
        let tmp = tempfile::tempdir().unwrap();
        let chroot = Chroot::new(tmp.path());
        std::fs::create_dir_all(chroot.state_dir()).unwrap();
        assert_eq!(load(&chroot).unwrap(), None);
        let (all, tags) = fleet();
        let mut p = Progress::new(
            "2026-11-25T12:00:00Z".into(),
            plan(&sels(&["100%"]), &all, &tags).unwrap(),
        );
        p.phase = Phase::Halted;
        p.halt = Some(Halt {
            reason: "failed".into(),
            hosts: vec![h("web-1")],
        });
        save(&chroot, &p).unwrap();
        assert_eq!(load(&chroot).unwrap(), Some(p));
        std::fs::write(state_path(&chroot), "{").unwrap();
        assert!(load(&chroot)
            .unwrap_err()
            .to_string()
            .contains("rollout.json"));
    }

    #[test]
    fn a_progress_pointing_past_its_waves_is_refused_saying_how_to_clear_it() {
        let tmp = tempfile::tempdir().unwrap();
        let chroot = Chroot::new(tmp.path());
        std::fs::create_dir_all(chroot.state_dir()).unwrap();
        for (waves, wave, phase) in [
            ("[]", 0, "running"),
            ("[]", 0, "halted"),
            (r#"[{"selector":"100%","hosts":["a"]}]"#, 1, "halted"),
            (r#"[{"selector":"100%","hosts":["a"]}]"#, 0, "done"),
        ] {
            let text = format!(
                r#"{{"format":1,"started":"t","waves":{waves},"wave":{wave},"phase":"{phase}","halt":null}}"#
            );
            std::fs::write(state_path(&chroot), text).unwrap();
            let err = load(&chroot).unwrap_err().to_string();
            assert!(err.contains("rollout.json"), "{err}");
            assert!(err.contains("without --resume"), "{err}");
        }
        std::fs::write(
            state_path(&chroot),
            r#"{"format":1,"started":"t","waves":[],"wave":0,"phase":"done","halt":null}"#,
        )
        .unwrap();
        assert!(load(&chroot).unwrap().is_some());
    }
}
