//! What one run should do, decided from facts alone: the state file, what `current` names,
//! the running system, `--force`, the settings and the clock. No I/O, so every rule here is
//! a plain test.
//!
//! Invariant: a version is tried at most once per back-off step and never again after a
//! rollback (until `--force` or a newer version), and an up-to-date host does nothing but
//! write its heartbeat — the common case costs one connection and one small read.

use std::time::Duration;

use super::state::State;
use crate::protocol::manifest::Digest;
use crate::protocol::{StorePath, Timestamp};

/// A self-update (re-locking flake inputs) is tried at most this often.
pub const SELF_UPDATE_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Everything the decision depends on.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub state: &'a State,
    /// The version `current` names; `None` when nothing is published yet.
    pub current: Option<Digest>,
    pub running: Option<&'a StorePath>,
    /// Retry a failed or rolled-back version now.
    pub force: bool,
    /// Unix seconds.
    pub now: u64,
    /// The applied version is a flake host whose settings ask for self-update.
    pub self_update: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do, and why (for the person watching).
    NoOp(String),
    /// Fetch, build and activate the published version.
    Apply(Digest),
    /// Re-lock the applied version's flake inputs and apply the result if it differs.
    SelfUpdate(Digest),
}

pub fn decide(f: &Facts<'_>) -> Decision {
    let Some(version) = f.current else {
        return Decision::NoOp("nothing is published for this host yet".into());
    };
    if is_up_to_date(f.state, &version, f.running) {
        let due = f
            .state
            .self_update_at
            .is_none_or(|t| f.now.saturating_sub(t) >= SELF_UPDATE_EVERY.as_secs());
        if f.self_update && due {
            return Decision::SelfUpdate(version);
        }
        return Decision::NoOp(format!("up to date (version {})", version.short()));
    }
    match skip_reason(f.state, &version, f.force, f.now) {
        Some(reason) => Decision::NoOp(reason),
        None => Decision::Apply(version),
    }
}

/// `version` is applied and its system is the one running.
pub fn is_up_to_date(state: &State, version: &Digest, running: Option<&StorePath>) -> bool {
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

/// A version as the replay rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    pub version: Digest,
    /// The manifest's `serial`; 0 for a manifest (or a state) from before serials.
    pub serial: u64,
    pub created: Option<&'a Timestamp>,
}

/// Why a fetched manifest must be refused as a replay of an older snapshot, if it must.
/// Versions are ordered by serial, never by clocks: one manifest stamped in the future
/// cannot lock a host out. The transition from manifests without serials: the first one
/// with a serial is newer than any without (publish numbers from 1 once it knows serials),
/// a manifest without a serial after one with is a replay, and between two without the
/// old rule (`created` times) stands.
pub fn replay_refusal(applied: &Stamp<'_>, new: &Stamp<'_>) -> Option<String> {
    let short = new.version.short();
    match (applied.serial, new.serial) {
        (0, 0) => {
            let (Some(a), Some(n)) = (applied.created, new.created) else {
                return None;
            };
            (n.system_time() < a.system_time()).then(|| {
                format!(
                    "manifest {short} was created {n}, before the applied version ({a}); refusing a replayed older snapshot"
                )
            })
        }
        (0, _) => None,
        (a, 0) => Some(format!(
            "manifest {short} has no serial, and the applied version {} has serial {a}; refusing a replayed snapshot from before serials{}",
            applied.version.short(),
            way_out(a)
        )),
        (a, n) if n < a || (n == a && new.version != applied.version) => Some(format!(
            "manifest {short} has serial {n}, not above the applied version {}'s serial {a}; refusing a replayed older snapshot{}",
            applied.version.short(),
            way_out(a)
        )),
        _ => None,
    }
}

/// A manifest stamped more than a few minutes after this machine's `now`: one of the two
/// clocks is wrong (issue #24 item 6). Versions are ordered by serial, so this is a warning,
/// never a refusal.
pub fn clock_warning(created: &Timestamp, now: std::time::SystemTime) -> Option<String> {
    const FEW_MINUTES: std::time::Duration = std::time::Duration::from_secs(5 * 60);
    let ahead = created.system_time().duration_since(now).ok()?;
    (ahead > FEW_MINUTES).then(|| {
        format!(
            "the manifest was created at {created}, {}s after this machine's clock says it is now: this machine's clock is behind (or the publisher's ahead); fix the time (NTP). Versions are ordered by serial, so the update goes on",
            ahead.as_secs()
        )
    })
}

/// What the operator does when the refusal is no attack but a server that lost its serials.
fn way_out(applied: u64) -> String {
    format!(
        " (if the server was restored or lost its state, publish this host again above it: `bento publish --host <this host> --serial-floor {}`; docs/operators.md, \"When the server was restored\")",
        applied.saturating_add(1)
    )
}

#[cfg(test)]
mod tests {
    use super::super::state::Applied;
    use super::*;

    fn sp(s: &str) -> StorePath {
        StorePath::new(&format!("/nix/store/{}-{s}", "a".repeat(32))).unwrap()
    }

    fn facts<'a>(state: &'a State, current: Digest, running: &'a StorePath) -> Facts<'a> {
        Facts {
            state,
            current: Some(current),
            running: Some(running),
            force: false,
            now: 0,
            self_update: false,
        }
    }

    #[test]
    fn agent_decides_skips_and_retries() {
        let v1 = Digest::of(b"1");
        let v2 = Digest::of(b"2");
        let one = sp("one");
        let mut s = State {
            applied: Some(Applied {
                version: v1,
                system: one.clone(),
                at: 0,
                created: None,
                serial: None,
            }),
            ..Default::default()
        };
        assert!(
            matches!(decide(&facts(&s, v1, &one)), Decision::NoOp(r) if r.contains("up to date"))
        );
        // Someone switched to another system by hand: apply again.
        let other = sp("other");
        assert_eq!(decide(&facts(&s, v1, &other)), Decision::Apply(v1));
        assert_eq!(decide(&facts(&s, v2, &one)), Decision::Apply(v2));
        s.record_rollback(v2);
        assert!(
            matches!(decide(&facts(&s, v2, &one)), Decision::NoOp(r) if r.contains("rolled back"))
        );
        let forced = Facts {
            force: true,
            ..facts(&s, v2, &one)
        };
        assert_eq!(decide(&forced), Decision::Apply(v2));
        let v3 = Digest::of(b"3");
        s.record_failure(v3, 1000);
        let at = |now| Facts {
            now,
            ..facts(&s, v3, &one)
        };
        assert!(matches!(decide(&at(1100)), Decision::NoOp(r) if r.contains("retrying in")));
        assert_eq!(decide(&at(1000 + 301)), Decision::Apply(v3));
        // The clock went back past the failure: retry rather than wait a day.
        assert_eq!(decide(&at(10)), Decision::Apply(v3));
        let nothing = Facts {
            current: None,
            ..facts(&s, v3, &one)
        };
        assert!(
            matches!(decide(&nothing), Decision::NoOp(r) if r.contains("nothing is published"))
        );
    }

    #[test]
    fn agent_self_updates_at_most_daily() {
        let v1 = Digest::of(b"1");
        let one = sp("one");
        let mut s = State {
            applied: Some(Applied {
                version: v1,
                system: one.clone(),
                at: 0,
                created: None,
                serial: None,
            }),
            ..Default::default()
        };
        let day = SELF_UPDATE_EVERY.as_secs();
        let f = |s: &State, now, self_update| {
            decide(&Facts {
                now,
                self_update,
                ..facts(s, v1, &one)
            })
        };
        assert_eq!(f(&s, 5 * day, true), Decision::SelfUpdate(v1));
        assert!(matches!(f(&s, 5 * day, false), Decision::NoOp(_)));
        s.self_update_at = Some(5 * day);
        assert!(matches!(f(&s, 6 * day - 1, true), Decision::NoOp(_)));
        assert_eq!(f(&s, 6 * day, true), Decision::SelfUpdate(v1));
    }

    #[test]
    fn a_manifest_from_the_future_is_a_clock_warning() {
        let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let at = |secs: u64| {
            Timestamp::seconds(
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            )
        };
        assert_eq!(
            clock_warning(&at(1_800_000_000 - 86_400), now),
            None,
            "old is normal"
        );
        assert_eq!(
            clock_warning(&at(1_800_000_000 + 60), now),
            None,
            "a minute is noise"
        );
        let w = clock_warning(&at(1_800_000_000 + 3 * 3600), now).unwrap();
        assert!(w.contains("10800s") && w.contains("clock is behind"), "{w}");
    }

    #[test]
    fn versions_are_ordered_by_serial_not_by_clocks() {
        let (v1, v2) = (Digest::of(b"1"), Digest::of(b"2"));
        let future: Timestamp = "2099-01-01T00:00:00Z".parse().unwrap();
        let today: Timestamp = "2026-12-01T00:00:00Z".parse().unwrap();
        let stamp = |version, serial, created| Stamp {
            version,
            serial,
            created: Some(created),
        };
        // Issue #14 item 7: a version stamped in the future does not lock the host out.
        assert_eq!(
            replay_refusal(&stamp(v1, 5, &future), &stamp(v2, 6, &today)),
            None
        );
        // An older or equal serial is a replay, whatever the times say.
        let older = replay_refusal(&stamp(v1, 6, &today), &stamp(v2, 5, &future)).unwrap();
        assert!(
            older.contains("serial 5")
                && older.contains("replayed")
                && older.contains("--serial-floor 7"),
            "{older}"
        );
        assert!(replay_refusal(&stamp(v1, 6, &today), &stamp(v2, 6, &future)).is_some());
        // The same version again (running system changed by hand) is no replay.
        assert_eq!(
            replay_refusal(&stamp(v1, 6, &today), &stamp(v1, 6, &today)),
            None
        );
        // Transition: a first serial after a state from before serials is accepted, even
        // when the old version was stamped in the future (that is the way out of item 7);
        // a manifest without a serial after one with is a replay.
        assert_eq!(
            replay_refusal(&stamp(v1, 0, &future), &stamp(v2, 1, &today)),
            None
        );
        let pre = replay_refusal(&stamp(v1, 3, &today), &stamp(v2, 0, &future)).unwrap();
        assert!(pre.contains("no serial"), "{pre}");
        // Between two manifests without serials the time rule stands.
        assert!(replay_refusal(&stamp(v1, 0, &future), &stamp(v2, 0, &today)).is_some());
        assert_eq!(
            replay_refusal(&stamp(v1, 0, &today), &stamp(v2, 0, &future)),
            None
        );
        let none = Stamp {
            version: v1,
            serial: 0,
            created: None,
        };
        assert_eq!(replay_refusal(&none, &stamp(v2, 0, &today)), None);
    }
}
