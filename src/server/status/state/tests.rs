//! The state decision, case by case.

use super::*;
use crate::protocol::report::Timings;
use crate::protocol::HostName;

const T0: u64 = 1_790_000_000;
const MIN: Duration = Duration::from_secs(60);
const INTERVAL: Duration = Duration::from_secs(15 * 60);

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}
fn time(t: SystemTime) -> crate::protocol::Timestamp {
    crate::protocol::Timestamp::seconds(t)
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
        verifies_signatures: None,
        serial: None,
        stale: None,
        clock_offset_s: None,
        formats: vec![],
    }
}
fn report(t: SystemTime, version: Digest, outcome: Outcome, before: char, after: char) -> Report {
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
        checks: Vec::new(),
        clock_warning: None,
        clock_offset_s: None,
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
            "unknown",
            "failing",
            "rolled-back",
            "silent",
            "stale",
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

/// Issue #24 item 11: a long error in the status row is cut in the middle, so the fix at its
/// end is still shown.
#[test]
fn a_long_status_error_keeps_its_fix() {
    let error = format!(
        "manifest 3f2a1b9c0d12: serial 1 is older than the applied serial 7: replayed? {} (run `bento publish --serial-floor 8`)",
        "detail ".repeat(60)
    );
    let shown = one_line(Some(&error));
    assert_eq!(shown.chars().count(), 200);
    assert!(
        shown.starts_with("manifest 3f2a1b9c0d12: serial 1"),
        "{shown}"
    );
    assert!(
        shown.ends_with("(run `bento publish --serial-floor 8`)"),
        "{shown}"
    );
}

/// Issue #27 item 4: a host that says its source is stale is `stale`, an alarm, whatever its
/// versions say; a later heartbeat without the word clears it.
#[test]
fn a_host_whose_source_is_stale_is_stale() {
    let hb = Heartbeat {
        stale: Some("the freshness stamp of the live version 3f2a ran out\u{1b}[31m\nmore".into()),
        ..heartbeat(at(T0 - 60), Some(v(2)), 'b')
    };
    let f = Facts {
        published: published(2),
        heartbeat: Some(&hb),
        ..Default::default()
    };
    let a = assess(&f, at(T0), INTERVAL);
    assert_eq!(a.state, State::Stale);
    assert!(a.state.is_alarm());
    assert_eq!(
        a.reason.as_deref(),
        Some("the freshness stamp of the live version 3f2a ran out[31m")
    );
    let hb = heartbeat(at(T0 - 60), Some(v(2)), 'b');
    let f = Facts {
        heartbeat: Some(&hb),
        ..f
    };
    assert_eq!(assess(&f, at(T0), INTERVAL).state, State::UpToDate);
}
