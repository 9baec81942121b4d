//! Following hosts until each has reported on its newest version (`publish --wait`,
//! `trigger --wait`, every wave of `rollout`). `decide` is the pure state machine: a
//! host's status row (as `bento status` computes it) and its newest report id in, an
//! outcome or "keep waiting" out. `follow` polls each pending host's `logs/` through
//! `server::logs` at a bounded interval until all are decided or the deadline passes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::protocol::layout::Chroot;
use crate::protocol::manifest::Digest;
use crate::protocol::report::{Report, LATEST_FILE};
use crate::protocol::HostName;
use crate::server::status::{self, State};
use crate::server::store::Store;

/// How a followed host ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Runs its newest version and the expected system.
    Success,
    /// Its attempt at the newest version failed; it kept its previous system.
    Failure,
    /// It applied the newest version, lost the server and went back.
    RolledBack,
    /// It runs something else than what it applied (changed by hand).
    Drifted,
    /// No answer before the deadline.
    TimedOut,
}

impl Outcome {
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::RolledBack => "rolled-back",
            Outcome::Drifted => "drifted",
            Outcome::TimedOut => "timed-out",
        }
    }
}

/// One host's end, a line of output and a `--json` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finished {
    pub host: HostName,
    pub outcome: Outcome,
    /// Its `bento status` state when it was decided.
    pub state: State,
    /// The version it was judged on (the live one).
    pub version: Option<Digest>,
    pub error: Option<String>,
}

/// What one poll saw of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub state: State,
    pub reason: Option<String>,
    pub version: Option<Digest>,
    /// The id of `logs/latest.json`, if readable.
    pub report: Option<String>,
    /// The version that report is about.
    pub report_version: Option<Digest>,
}

/// The decision for one host. `baseline` is the newest report id when following started;
/// with `fresh`, a failure, rollback or drift must come from a newer report about the live
/// version (a retried run, a rollout wave's run), not one the host had written before: a
/// host already drifted, or failing on an older version, is not judged on that.
pub fn decide(seen: &Seen, baseline: Option<&str>, fresh: bool) -> Option<Outcome> {
    let about_live = seen.report_version.is_some() && seen.report_version == seen.version;
    let old_report = fresh && (seen.report.as_deref() == baseline || !about_live);
    match seen.state {
        State::UpToDate | State::Held => Some(Outcome::Success),
        State::Failing if !old_report => Some(Outcome::Failure),
        State::RolledBack if !old_report => Some(Outcome::RolledBack),
        State::Drifted if !old_report => Some(Outcome::Drifted),
        // Pending, new, silent, or an old failure: the host may still answer.
        _ => None,
    }
}

/// The hosts still followed and what has been decided.
#[derive(Debug, Clone)]
pub struct Tracker {
    fresh: bool,
    pending: BTreeMap<HostName, (Option<String>, Option<Seen>)>,
    pub finished: Vec<Finished>,
}

impl Tracker {
    /// `hosts` with their baseline report ids.
    pub fn new(hosts: Vec<(HostName, Option<String>)>, fresh: bool) -> Self {
        Self {
            fresh,
            pending: hosts.into_iter().map(|(h, b)| (h, (b, None))).collect(),
            finished: Vec::new(),
        }
    }

    pub fn pending(&self) -> Vec<HostName> {
        self.pending.keys().cloned().collect()
    }

    pub fn total(&self) -> usize {
        self.pending.len() + self.finished.len()
    }

    pub fn is_done(&self) -> bool {
        self.pending.is_empty()
    }

    /// True when a decided host did not succeed.
    pub fn any_failed(&self) -> bool {
        self.finished.iter().any(|f| f.outcome != Outcome::Success)
    }

    /// Records a poll; returns the host's end when this poll decided it.
    pub fn observe(&mut self, host: &HostName, seen: Seen) -> Option<Finished> {
        let (baseline, last) = self.pending.get_mut(host)?;
        let Some(outcome) = decide(&seen, baseline.as_deref(), self.fresh) else {
            *last = Some(seen);
            return None;
        };
        self.pending.remove(host);
        let f = Finished {
            host: host.clone(),
            outcome,
            state: seen.state,
            version: seen.version,
            error: if outcome == Outcome::Success {
                None
            } else {
                seen.reason
            },
        };
        self.finished.push(f.clone());
        Some(f)
    }

    /// The deadline passed: every pending host times out, with what it last looked like.
    pub fn expire(&mut self) -> Vec<Finished> {
        let out: Vec<Finished> = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(host, (_, last))| {
                let (state, version, why) = match last {
                    Some(s) => (s.state, s.version, s.reason),
                    None => (State::New, None, None),
                };
                let mut error = format!(
                    "no report on its newest version in time (it is {})",
                    state.label()
                );
                if let Some(w) = why {
                    error = format!("{error}: {w}");
                }
                Finished {
                    host,
                    outcome: Outcome::TimedOut,
                    state,
                    version,
                    error: Some(error),
                }
            })
            .collect();
        self.finished.extend(out.iter().cloned());
        out
    }
}

/// The id of the host's newest report, read like every host-written file.
pub fn latest_report_id(store: &dyn Store, host: &HostName) -> Option<String> {
    latest_report(store, host).map(|(id, _)| id)
}

/// The id of the host's newest report and the version it is about.
pub fn latest_report(store: &dyn Store, host: &HostName) -> Option<(String, Digest)> {
    let bytes = store.read_log(host, None, LATEST_FILE).ok()?;
    Report::parse(&bytes).ok().map(|r| (r.id, r.version))
}

/// How to follow.
pub struct Follow<'a> {
    /// Where the versions and the hosts' reports are.
    pub store: &'a dyn Store,
    /// The publisher's state (build records).
    pub chroot: &'a Chroot,
    /// Each host's polling interval (silence is judged by it).
    pub interval: &'a (dyn Fn(&HostName) -> Duration + Sync),
    pub timeout: Duration,
    /// Time between polls of the pending hosts.
    pub poll: Duration,
    /// Stop at the first host that does not succeed (rollout).
    pub stop_on_failure: bool,
}

/// Looks at every pending host once.
pub fn poll_once(tracker: &mut Tracker, f: &Follow<'_>, on: &mut dyn FnMut(&Finished, &Tracker)) {
    let now = SystemTime::now();
    // A few hosts, polled: their heads read from the manifests, nothing remembered.
    let (heads, memo) = (status::Heads::default(), status::memo::Memo::default());
    for host in tracker.pending() {
        let row = status::host_status(
            f.store,
            f.chroot,
            &heads,
            &memo,
            &host,
            now,
            (f.interval)(&host),
        );
        let latest = latest_report(f.store, &host);
        let seen = Seen {
            state: row.state,
            reason: row.error.clone(),
            version: row.published,
            report_version: latest.as_ref().map(|(_, v)| *v),
            report: latest.map(|(id, _)| id),
        };
        if let Some(done) = tracker.observe(&host, seen) {
            on(&done, tracker);
        }
    }
}

/// Polls until every host is decided, the timeout passes, or (with `stop_on_failure`) a
/// host fails. Hosts still pending at the timeout end as `timed-out`; with
/// `stop_on_failure`, hosts still pending after a failure stay pending in the tracker.
pub fn follow(tracker: &mut Tracker, f: &Follow<'_>, on: &mut dyn FnMut(&Finished, &Tracker)) {
    let deadline = Instant::now() + f.timeout;
    loop {
        poll_once(tracker, f, on);
        if tracker.is_done() || (f.stop_on_failure && tracker.any_failed()) {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            for done in tracker.expire() {
                on(&done, tracker);
            }
            return;
        }
        std::thread::sleep(f.poll.min(deadline - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: &str) -> HostName {
        HostName::new(n).unwrap()
    }
    fn seen(state: State, report: Option<&str>) -> Seen {
        Seen {
            state,
            reason: Some(format!("{} because", state.key())),
            version: Some(Digest::of(b"v2")),
            report: report.map(str::to_owned),
            report_version: report.map(|_| Digest::of(b"v2")),
        }
    }

    /// Issue #24 item 7: a rollout wave judges its hosts only on reports about the version
    /// it published, newer than the ones they had: an old drift or failure is no verdict.
    #[test]
    fn a_fresh_follow_ignores_reports_about_older_versions() {
        let old = |state| Seen {
            report_version: Some(Digest::of(b"v1")),
            ..seen(state, Some("r2"))
        };
        for state in [State::Drifted, State::Failing, State::RolledBack] {
            assert_eq!(decide(&old(state), Some("r1"), true), None, "{state:?}");
            // The same report seen by a plain `publish --wait` still decides.
            assert!(
                decide(&old(state), Some("r1"), false).is_some(),
                "{state:?}"
            );
        }
        // Up to date is up to date, whatever report says so.
        assert_eq!(
            decide(&old(State::UpToDate), Some("r1"), true),
            Some(Outcome::Success)
        );
        // A new report about the live version decides.
        assert_eq!(
            decide(&seen(State::Drifted, Some("r2")), Some("r1"), true),
            Some(Outcome::Drifted)
        );
    }

    #[test]
    fn decisions() {
        use Outcome::*;
        let d = |state, report, fresh| decide(&seen(state, report), Some("r1"), fresh);
        assert_eq!(d(State::UpToDate, Some("r1"), true), Some(Success));
        assert_eq!(d(State::UpdatePending, Some("r1"), false), None);
        assert_eq!(d(State::New, None, false), None);
        assert_eq!(d(State::Silent, Some("r2"), false), None);
        // A failure at the live version ends a publish's wait at once...
        assert_eq!(d(State::Failing, Some("r1"), false), Some(Failure));
        assert_eq!(d(State::RolledBack, Some("r1"), false), Some(RolledBack));
        // ...but a triggered retry waits for a report newer than the one it started from.
        assert_eq!(d(State::Failing, Some("r1"), true), None);
        assert_eq!(d(State::Failing, Some("r2"), true), Some(Failure));
        assert_eq!(d(State::RolledBack, Some("r2"), true), Some(RolledBack));
        assert_eq!(d(State::Drifted, Some("r2"), true), Some(Drifted));
    }

    #[test]
    fn the_tracker_follows_each_host_to_its_end_or_the_deadline() {
        let mut t = Tracker::new(
            vec![(h("a"), None), (h("b"), Some("r1".into())), (h("c"), None)],
            false,
        );
        assert_eq!(t.total(), 3);
        assert!(t
            .observe(&h("a"), seen(State::UpdatePending, None))
            .is_none());
        let b = t
            .observe(&h("b"), seen(State::Failing, Some("r2")))
            .unwrap();
        assert_eq!(b.outcome, Outcome::Failure);
        assert_eq!(b.error.as_deref(), Some("failing because"));
        assert!(t.any_failed());
        // A decided host is not observed again.
        assert!(t.observe(&h("b"), seen(State::UpToDate, None)).is_none());
        let a = t
            .observe(&h("a"), seen(State::UpToDate, Some("r9")))
            .unwrap();
        assert_eq!((a.outcome, a.error), (Outcome::Success, None));
        assert_eq!(t.pending(), vec![h("c")]);
        t.observe(&h("c"), seen(State::Silent, None));
        let expired = t.expire();
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].outcome, Outcome::TimedOut);
        assert_eq!(expired[0].state, State::Silent);
        assert!(expired[0].error.as_deref().unwrap().contains("silent"));
        assert!(t.is_done());
        assert_eq!(t.finished.len(), 3);
    }

    #[test]
    fn follow_is_bounded_by_its_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        let chroot = Chroot::new(tmp.path());
        let store = crate::server::store::ChrootStore::new(
            chroot.clone(),
            crate::server::chroot::Ownership::Leave,
        );
        let mut t = Tracker::new(vec![(h("a"), None)], false);
        let started = Instant::now();
        let mut ends = Vec::new();
        follow(
            &mut t,
            &Follow {
                store: &store,
                chroot: &chroot,
                interval: &|_| Duration::from_secs(900),
                timeout: Duration::from_millis(300),
                poll: Duration::from_millis(50),
                stop_on_failure: false,
            },
            &mut |f, _| ends.push(f.clone()),
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(ends.len(), 1);
        assert_eq!(ends[0].outcome, Outcome::TimedOut);
        assert_eq!(ends[0].state, State::New);
    }
}
