//! The state of one host, as a pure function of what the server published and what the
//! host last said (heartbeat, newest report), the time and the host's polling interval. No
//! file timestamps: a host that reports version N while N+1 is being published compares its
//! digest with the live one and is `update pending`, never `up to date`.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::nix::StorePath;
use crate::protocol::manifest::Digest;
use crate::protocol::report::{Heartbeat, Outcome, Report};

/// A host is silent after this many polling intervals without a heartbeat.
pub const SILENT_AFTER_INTERVALS: u32 = 3;

/// What `bento status` says about a host. The JSON names are a stable interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    // Declared in table order: problems first.
    Failing,
    RolledBack,
    Silent,
    Drifted,
    UpdatePending,
    New,
    // rollout (#13): `hold = true` in bento.toml; set by server/rollout.rs `annotate`, never by `assess`.
    Held,
    UpToDate,
}

impl State {
    pub const ALL: [State; 8] = [
        State::Failing,
        State::RolledBack,
        State::Silent,
        State::Drifted,
        State::UpdatePending,
        State::New,
        State::Held,
        State::UpToDate,
    ];

    /// The words of the table.
    pub fn label(self) -> &'static str {
        match self {
            State::UpToDate => "up to date",
            State::UpdatePending => "update pending",
            State::Failing => "failing",
            State::RolledBack => "rolled back",
            State::Drifted => "drifted",
            State::New => "new",
            State::Silent => "silent",
            State::Held => "held",
        }
    }

    /// The JSON and metrics name (kebab-case).
    pub fn key(self) -> &'static str {
        match self {
            State::UpToDate => "up-to-date",
            State::UpdatePending => "update-pending",
            State::Failing => "failing",
            State::RolledBack => "rolled-back",
            State::Drifted => "drifted",
            State::New => "new",
            State::Silent => "silent",
            State::Held => "held",
        }
    }

    /// States that make `bento status` exit non-zero: the host needs a person.
    pub fn is_alarm(self) -> bool {
        matches!(self, State::Failing | State::RolledBack | State::Silent)
    }
}

/// The live version of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub digest: Digest,
    pub created: SystemTime,
}

/// Everything the state depends on.
#[derive(Debug, Clone, Default)]
pub struct Facts<'a> {
    pub published: Option<Published>,
    /// What the published version builds to (manifest `system`, else `bento build`'s record).
    pub expected: Option<&'a StorePath>,
    pub heartbeat: Option<&'a Heartbeat>,
    pub latest: Option<&'a Report>,
}

/// A state and, for problems, one line saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    pub state: State,
    pub reason: Option<String>,
}

impl Assessment {
    fn new(state: State) -> Self {
        Self {
            state,
            reason: None,
        }
    }

    fn because(state: State, reason: impl Into<String>) -> Self {
        Self {
            state,
            reason: Some(reason.into()),
        }
    }
}

/// Parses an RFC 3339 time written by a host; `None` when it is not one.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text).ok()
}

/// When the host was last heard from: its newest heartbeat or report.
pub fn last_seen(facts: &Facts<'_>) -> Option<SystemTime> {
    let hb = facts.heartbeat.and_then(|h| parse_time(&h.time));
    let rep = facts.latest.and_then(|r| parse_time(&r.finished));
    hb.max(rep)
}

/// A short duration for messages: `45s`, `12m`, `3h`, `2d`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The state of a host at `now`, given its polling `interval`.
pub fn assess(facts: &Facts<'_>, now: SystemTime, interval: Duration) -> Assessment {
    let (hb, latest) = (facts.heartbeat, facts.latest);
    if hb.is_none() && latest.is_none() {
        return Assessment::new(State::New);
    }
    // A host that wrote files whose times cannot be read is as good as silent.
    let seen = last_seen(facts);
    let quiet = seen.map(|t| now.duration_since(t).unwrap_or_default());
    let limit = interval * SILENT_AFTER_INTERVALS;
    match quiet {
        None => return Assessment::because(State::Silent, "its heartbeat has no readable time"),
        Some(q) if q > limit => {
            return Assessment::because(
                State::Silent,
                format!(
                    "no heartbeat for {} (polls every {})",
                    short_duration(q),
                    short_duration(interval)
                ),
            )
        }
        Some(_) => {}
    }

    let running_version = hb.and_then(|h| h.version);
    let running_system = hb.and_then(|h| h.system.as_deref());
    let Some(published) = &facts.published else {
        return Assessment::because(State::UpdatePending, "nothing is published for it yet");
    };
    // The newest attempt, if it was at the live version (a failed self-update is not: the
    // host still runs the published version).
    let attempt = latest.filter(|r| {
        r.version == published.digest && r.kind == crate::protocol::report::RunKind::Published
    });
    // A heartbeat older than the report it follows has not caught up yet: trust the report.
    let hb_is_stale = match (hb, latest) {
        (Some(h), Some(r)) => parse_time(&h.time) < parse_time(&r.finished),
        (None, Some(_)) => true,
        _ => false,
    };

    if running_version == Some(published.digest) && !hb_is_stale {
        // A self-update re-locked the flake's inputs on the host: it runs the published
        // version, built from newer inputs, on purpose.
        if hb.is_some_and(|h| h.auto_updated) {
            return Assessment::because(
                State::UpToDate,
                "auto-updated: flake inputs re-locked on the host",
            );
        }
        return check_system(running_system, facts.expected, attempt);
    }
    if let Some(r) = attempt {
        match r.outcome {
            Outcome::Failure => {
                return Assessment::because(State::Failing, one_line(r.error.as_deref()))
            }
            Outcome::Rollback => {
                return Assessment::because(State::RolledBack, one_line(r.error.as_deref()))
            }
            Outcome::Success if hb_is_stale => {
                return check_system(r.system_after.as_deref(), facts.expected, Some(r));
            }
            Outcome::Success => {
                // Applied the live version, and a later heartbeat says it runs another.
                return Assessment::because(
                    State::Drifted,
                    format!(
                        "applied {} but now runs version {}",
                        published.digest.short(),
                        running_version.map_or_else(|| "unknown".to_owned(), |d| d.short())
                    ),
                );
            }
        }
    }
    // No attempt at the live version yet. The host should still run what it last applied.
    if let (Some(r), Some(running)) = (latest, running_system) {
        let applied = match r.outcome {
            Outcome::Success => r.system_after.as_deref(),
            Outcome::Failure | Outcome::Rollback => r.system_before.as_deref(),
        };
        if Some(r.version) == running_version && applied.is_some_and(|a| a != running) {
            return drifted(running, applied);
        }
        // The agent writes no version when the running system is not the one it applied.
        let had_applied = r.outcome == Outcome::Success || r.previous_version.is_some();
        if running_version.is_none() && had_applied && !hb_is_stale {
            return drifted(running, applied);
        }
    }
    Assessment::new(State::UpdatePending)
}

/// The host runs the live version: up to date if its system is the one it should be.
fn check_system(
    running: Option<&str>,
    expected: Option<&StorePath>,
    attempt: Option<&Report>,
) -> Assessment {
    let should = expected
        .map(StorePath::as_str)
        .or_else(|| attempt.and_then(|r| r.system_after.as_deref()));
    match (running, should) {
        (Some(run), Some(should)) if run != should => drifted(run, Some(should)),
        _ => Assessment::new(State::UpToDate),
    }
}

fn drifted(running: &str, should: Option<&str>) -> Assessment {
    let name =
        |p: &str| StorePath::new(p).map_or_else(|_| p.to_owned(), |s| s.short_hash(8).to_owned());
    Assessment::because(
        State::Drifted,
        format!(
            "runs {} instead of {} (changed by hand?)",
            name(running),
            should.map_or_else(|| "?".to_owned(), name)
        ),
    )
}

/// The first line of a host-written error, bounded (a host is not trusted to be brief).
pub fn one_line(error: Option<&str>) -> String {
    let first = error
        .unwrap_or("no error message")
        .lines()
        .next()
        .unwrap_or("");
    let mut s: String = first
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if s.is_empty() {
        s.push_str("no error message");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::report::Timings;
    use crate::protocol::HostName;

    const T0: u64 = 1_790_000_000;
    const MIN: Duration = Duration::from_secs(60);
    const INTERVAL: Duration = Duration::from_secs(15 * 60);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }
    fn time(t: SystemTime) -> String {
        humantime::format_rfc3339_seconds(t).to_string()
    }
    fn sys(c: char) -> String {
        format!("/nix/store/{}-nixos-system-alpha", c.to_string().repeat(32))
    }
    fn v(n: u8) -> Digest {
        Digest::of(&[n])
    }
    fn heartbeat(t: SystemTime, version: Option<Digest>, system: char) -> Heartbeat {
        Heartbeat {
            format: 1,
            host: HostName::new("alpha").unwrap(),
            time: time(t),
            version,
            system: Some(sys(system)),
            last_outcome: None,
            last_report: None,
            agent_version: "0.1.0".into(),
            reboot_pending: false,
            auto_updated: false,
            last_success: None,
        }
    }
    fn report(
        t: SystemTime,
        version: Digest,
        outcome: Outcome,
        before: char,
        after: char,
    ) -> Report {
        Report {
            format: 1,
            id: "20261125T120000Z-00000000".into(),
            host: HostName::new("alpha").unwrap(),
            kind: crate::protocol::report::RunKind::Published,
            version,
            previous_version: Some(v(1)),
            outcome,
            system_before: Some(sys(before)),
            system_after: Some(sys(after)),
            built_system: Some(sys(after)),
            started: time(t - MIN),
            finished: time(t),
            timings: Timings::default(),
            agent_version: "0.1.0".into(),
            error: (outcome != Outcome::Success).then(|| "build failed: x\nmore".into()),
            log_tail: String::new(),
            reboot_required: false,
        }
    }
    fn published(n: u8) -> Option<Published> {
        Some(Published {
            digest: v(n),
            created: at(T0 - 3600),
        })
    }

    #[test]
    fn never_heard_from_is_new() {
        let f = Facts {
            published: published(2),
            ..Default::default()
        };
        assert_eq!(assess(&f, at(T0), INTERVAL).state, State::New);
    }

    #[test]
    fn running_the_live_version_and_its_system_is_up_to_date() {
        let expected = StorePath::new(&sys('b')).unwrap();
        let hb = heartbeat(at(T0 - 60), Some(v(2)), 'b');
        let rep = report(at(T0 - 120), v(2), Outcome::Success, 'a', 'b');
        let f = Facts {
            published: published(2),
            expected: Some(&expected),
            heartbeat: Some(&hb),
            latest: Some(&rep),
        };
        assert_eq!(
            assess(&f, at(T0), INTERVAL),
            Assessment::new(State::UpToDate)
        );
        // Without an expected system (never built on the server) the report vouches for it.
        let f = Facts {
            expected: None,
            ..f
        };
        assert_eq!(assess(&f, at(T0), INTERVAL).state, State::UpToDate);
    }

    #[test]
    fn a_host_on_the_previous_version_while_a_new_one_is_published_is_pending() {
        // The race: the host reported N (and says it runs N) while N+1 went live.
        let hb = heartbeat(at(T0 - 1), Some(v(1)), 'a');
        let rep = report(at(T0 - 2), v(1), Outcome::Success, 'z', 'a');
        let f = Facts {
            published: published(2),
            expected: None,
            heartbeat: Some(&hb),
            latest: Some(&rep),
        };
        assert_eq!(
            assess(&f, at(T0), INTERVAL),
            Assessment::new(State::UpdatePending)
        );
        // Also when its report landed after the publication (times do not decide).
        let f = Facts {
            published: Some(Published {
                digest: v(2),
                created: at(T0 - 3),
            }),
            ..f
        };
        assert_eq!(assess(&f, at(T0), INTERVAL).state, State::UpdatePending);
    }

    #[test]
    fn a_failed_attempt_at_the_live_version_is_failing_with_its_error() {
        let hb = heartbeat(at(T0 - 60), Some(v(1)), 'a');
        let rep = report(at(T0 - 90), v(2), Outcome::Failure, 'a', 'a');
        let f = Facts {
            published: published(2),
            heartbeat: Some(&hb),
            latest: Some(&rep),
            ..Default::default()
        };
        assert_eq!(
            assess(&f, at(T0), INTERVAL),
            Assessment::because(State::Failing, "build failed: x")
        );
        // A failure at an older version does not make the host failing: it has a new one to try.
        let old = report(at(T0 - 90), v(1), Outcome::Failure, 'a', 'a');
        let f = Facts {
            latest: Some(&old),
            ..f
        };
        assert_eq!(assess(&f, at(T0), INTERVAL).state, State::UpdatePending);
    }

    #[test]
    fn a_rollback_from_the_live_version_is_rolled_back() {
        let hb = heartbeat(at(T0 - 30), Some(v(1)), 'a');
        let rep = report(at(T0 - 60), v(2), Outcome::Rollback, 'a', 'a');
        let f = Facts {
            published: published(2),
            heartbeat: Some(&hb),
            latest: Some(&rep),
            ..Default::default()
        };
        assert_eq!(assess(&f, at(T0), INTERVAL).state, State::RolledBack);
    }

    #[test]
    fn a_system_changed_by_hand_is_drifted() {
        let expected = StorePath::new(&sys('b')).unwrap();
        // Runs the live version but a system nobody built for it.
        let hb = heartbeat(at(T0 - 60), Some(v(2)), 'x');
        let rep = report(at(T0 - 120), v(2), Outcome::Success, 'a', 'b');
        let f = Facts {
            published: published(2),
            expected: Some(&expected),
            heartbeat: Some(&hb),
            latest: Some(&rep),
        };
        let a = assess(&f, at(T0), INTERVAL);
        assert_eq!(a.state, State::Drifted);
        assert!(a.reason.unwrap().contains("xxxxxxxx"));
        // Without an expected system the report's system is what it should run.
        let f = Facts {
            expected: None,
            ..f.clone()
        };
        assert_eq!(assess(&f, at(T0), INTERVAL).state, State::Drifted);
        // Pending an update, but not running what it last applied either.
        let old = report(at(T0 - 120), v(1), Outcome::Success, 'a', 'b');
        let hb1 = heartbeat(at(T0 - 60), Some(v(1)), 'x');
        let f = Facts {
            heartbeat: Some(&hb1),
            latest: Some(&old),
            ..f
        };
        assert_eq!(assess(&f, at(T0), INTERVAL).state, State::Drifted);
    }

    #[test]
    fn an_auto_updated_host_is_up_to_date_and_a_failed_self_update_is_not_failing() {
        let expected = StorePath::new(&sys('b')).unwrap();
        let hb = Heartbeat {
            auto_updated: true,
            ..heartbeat(at(T0 - 60), Some(v(2)), 'x')
        };
        let mut rep = report(at(T0 - 120), v(2), Outcome::Success, 'b', 'x');
        rep.kind = crate::protocol::report::RunKind::AutoUpdated;
        let f = Facts {
            published: published(2),
            expected: Some(&expected),
            heartbeat: Some(&hb),
            latest: Some(&rep),
        };
        let a = assess(&f, at(T0), INTERVAL);
        assert_eq!(a.state, State::UpToDate);
        assert!(a.reason.unwrap().contains("auto-updated"));
        // A self-update that failed leaves the published system running: still up to date.
        let hb = heartbeat(at(T0 - 60), Some(v(2)), 'b');
        let mut failed = report(at(T0 - 120), v(2), Outcome::Failure, 'b', 'b');
        failed.kind = crate::protocol::report::RunKind::AutoUpdated;
        let f = Facts {
            heartbeat: Some(&hb),
            latest: Some(&failed),
            ..f
        };
        assert_eq!(assess(&f, at(T0), INTERVAL).state, State::UpToDate);
    }

    #[test]
    fn a_heartbeat_without_version_after_an_apply_is_drifted() {
        // The agent leaves `version` out when the running system is not the one it applied.
        let rep = report(at(T0 - 120), v(2), Outcome::Success, 'a', 'b');
        let hb = Heartbeat {
            version: None,
            ..heartbeat(at(T0 - 60), None, 'x')
        };
        let f = Facts {
            published: published(2),
            heartbeat: Some(&hb),
            latest: Some(&rep),
            ..Default::default()
        };
        assert_eq!(assess(&f, at(T0), INTERVAL).state, State::Drifted);
        // Before its first successful apply a host has no version either: that is pending.
        let mut first = report(at(T0 - 120), v(1), Outcome::Failure, 'x', 'x');
        first.previous_version = None;
        let f = Facts {
            latest: Some(&first),
            ..f
        };
        assert_eq!(assess(&f, at(T0), INTERVAL).state, State::UpdatePending);
    }

    #[test]
    fn three_intervals_without_a_heartbeat_is_silent() {
        let hb = heartbeat(at(T0), Some(v(2)), 'b');
        let f = Facts {
            published: published(2),
            heartbeat: Some(&hb),
            ..Default::default()
        };
        assert_eq!(
            assess(&f, at(T0) + INTERVAL * 3, INTERVAL).state,
            State::UpToDate
        );
        let a = assess(&f, at(T0) + INTERVAL * 3 + MIN, INTERVAL);
        assert_eq!(a.state, State::Silent);
        assert_eq!(
            a.reason.as_deref(),
            Some("no heartbeat for 46m (polls every 15m)")
        );
        // A longer interval gives the host more time.
        let hourly = Duration::from_secs(3600);
        assert_eq!(
            assess(&f, at(T0) + INTERVAL * 4, hourly).state,
            State::UpToDate
        );
    }

    #[test]
    fn a_report_newer_than_the_heartbeat_decides() {
        // latest.json landed, heartbeat.json not yet rewritten.
        let hb = heartbeat(at(T0 - 300), Some(v(1)), 'a');
        let rep = report(at(T0 - 10), v(2), Outcome::Success, 'a', 'b');
        let expected = StorePath::new(&sys('b')).unwrap();
        let f = Facts {
            published: published(2),
            expected: Some(&expected),
            heartbeat: Some(&hb),
            latest: Some(&rep),
        };
        assert_eq!(assess(&f, at(T0), INTERVAL).state, State::UpToDate);
        // A heartbeat saying it runs the live version cannot outvote a newer failure report.
        let hb2 = heartbeat(at(T0 - 300), Some(v(2)), 'b');
        let fail = report(at(T0 - 10), v(2), Outcome::Failure, 'b', 'b');
        let f = Facts {
            heartbeat: Some(&hb2),
            latest: Some(&fail),
            ..f
        };
        assert_eq!(assess(&f, at(T0), INTERVAL).state, State::Failing);
    }

    #[test]
    fn nothing_published_yet() {
        let hb = heartbeat(at(T0 - 60), None, 'a');
        let f = Facts {
            heartbeat: Some(&hb),
            ..Default::default()
        };
        assert_eq!(assess(&f, at(T0), INTERVAL).state, State::UpdatePending);
    }

    #[test]
    fn words_are_stable() {
        let keys: Vec<&str> = State::ALL.iter().map(|s| s.key()).collect();
        assert_eq!(
            keys,
            [
                "failing",
                "rolled-back",
                "silent",
                "drifted",
                "update-pending",
                "new",
                "held",
                "up-to-date"
            ]
        );
        for s in State::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.key());
            assert_eq!(s.label().replace(' ', "-"), s.key());
        }
        assert_eq!(one_line(Some("a\u{1b}[31m\nb")), "a[31m");
    }
}
