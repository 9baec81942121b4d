//! Health checks after activation, through the fake machine: each kind passing and failing,
//! the built-in failed-units diff, retrying until the window closes, and what a failure does
//! (`on_failure = "rollback"` puts back the exact previous system, `"keep"` leaves the new
//! one running), with every result in the report the server receives.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use super::fake::store_path;
use super::Bed;
use crate::agent::checks::{self, Baseline};
use crate::agent::outcome::RunLog;
use crate::agent::RunResult;
use crate::protocol::check::{CheckResult, CheckStatus};
use crate::protocol::report::{Outcome, Report};

const CHECKS: &str = "checks = [ { unit = \"web.service\" }, { http = \"http://127.0.0.1:8080/health\" }, { command = [\"/usr/bin/probe\", \"--quick\"] } ]\n";

fn set(units: &[&str]) -> BTreeSet<String> {
    units.iter().map(|u| u.to_string()).collect()
}

fn result<'a>(report: &'a Report, check: &str) -> &'a CheckResult {
    report
        .checks
        .iter()
        .find(|c| c.check == check)
        .unwrap_or_else(|| panic!("no result for {check}: {:?}", report.checks))
}

/// A machine running "old", with these settings, about to apply "one".
fn bed(settings: &str) -> Bed {
    let bed = Bed::new(settings);
    *bed.host.running.borrow_mut() = Some(store_path("old"));
    bed.publish("one");
    bed
}

#[test]
fn passing_checks_make_a_success_and_every_result_is_reported() {
    let bed = bed(CHECKS);
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_UPDATED, "{r:?}");
    let calls = bed.take_calls();
    for asked in [
        "is-active web.service",
        "GET http://127.0.0.1:8080/health",
        "command /usr/bin/probe --quick",
    ] {
        assert!(calls.iter().any(|c| c == asked), "{calls:?}");
    }
    let report = bed.latest().unwrap();
    assert_eq!(report.outcome, Outcome::Success);
    let names: Vec<&str> = report.checks.iter().map(|c| c.check.as_str()).collect();
    assert_eq!(
        names,
        [
            "failed-units",
            "unit web.service",
            "http http://127.0.0.1:8080/health",
            "command /usr/bin/probe --quick"
        ]
    );
    // systemd is not the service manager: the built-in check says so, never "passed".
    let builtin = result(&report, "failed-units");
    assert_eq!(builtin.result, CheckStatus::Skipped);
    assert!(builtin.detail.contains("systemd"), "{builtin:?}");
    assert_eq!(
        result(&report, "http http://127.0.0.1:8080/health").detail,
        "HTTP 200"
    );
    assert!(report.timings.checks_ms.is_some());
}

/// Each kind of failing check rolls back to the exact previous store path, and the report
/// names the check and what it saw.
#[test]
fn a_failing_check_of_each_kind_rolls_back_and_names_it() {
    for (broken, check, saw) in [
        ("unit", "unit web.service", "failed"),
        ("http", "http http://127.0.0.1:8080/health", "HTTP 500"),
        ("command", "command /bin/false", "exited with status 1"),
    ] {
        let settings = match broken {
            "command" => "checks = [ { command = [\"/bin/false\"] } ]\n".to_owned(),
            _ => CHECKS.to_owned(),
        };
        let bed = bed(&format!("notify = [\"/bin/mail\"]\n{settings}"));
        match broken {
            "unit" => {
                bed.host
                    .failed_under
                    .borrow_mut()
                    .insert("nixos-system-one".into(), set(&["web.service"]));
            }
            "http" => {
                bed.host
                    .http
                    .borrow_mut()
                    .insert("http://127.0.0.1:8080/health".into(), Some(500));
            }
            _ => {}
        }
        let r = bed.run();
        assert_eq!(
            r.exit_code(),
            RunResult::EXIT_ROLLED_BACK,
            "{broken}: {r:?}"
        );
        let calls = bed.take_calls();
        let tail: Vec<&str> = calls
            .iter()
            .map(String::as_str)
            .filter(|c| c.starts_with("set_profile") || c.starts_with("activate"))
            .collect();
        assert_eq!(
            tail,
            [
                "set_profile nixos-system-one",
                "activate nixos-system-one switch",
                "set_profile nixos-system-old",
                "activate nixos-system-old switch",
            ],
            "{broken}"
        );
        assert_eq!(bed.host.running_name(), "nixos-system-old");
        assert!(
            calls.iter().any(|c| c == "notify /bin/mail rollback"),
            "{calls:?}"
        );
        // The server has the report at once: the connection was confirmed before the checks.
        let report = bed.latest().expect("the rollback's report is delivered");
        assert_eq!(report.outcome, Outcome::Rollback, "{broken}");
        let error = report.error.clone().unwrap();
        assert!(
            error.starts_with(&format!("health check failed: {check} ({saw})")),
            "{broken}: {error}"
        );
        assert!(error.contains("back on"), "{error}");
        let r = result(&report, check);
        assert_eq!((r.result, r.detail.as_str()), (CheckStatus::Failed, saw));
        // The version is not tried again until a newer one or --force.
        let state = bed.state();
        assert!(state.rolled_back.contains(&report.version), "{state:?}");
        assert_eq!(state.applied, None);
    }
}

#[test]
fn on_failure_keep_leaves_the_new_system_and_reports_failure() {
    let bed = bed("on_failure = \"keep\"\nchecks = [ { command = [\"/bin/false\"] } ]\n");
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_FAILED, "{r:?}");
    let calls = bed.take_calls();
    assert!(
        !calls.iter().any(|c| c.contains("nixos-system-old")),
        "nothing went back: {calls:?}"
    );
    assert_eq!(bed.host.running_name(), "nixos-system-one");
    let report = bed.latest().unwrap();
    assert_eq!(report.outcome, Outcome::Failure);
    assert_eq!(
        report.system_after.as_deref(),
        Some(store_path("one").as_str())
    );
    let error = report.error.unwrap();
    assert!(
        error.contains("command /bin/false") && error.contains("keep"),
        "{error}"
    );

    // Tried again (forced, or after the back-off): the build is already running, and the
    // checks still decide; a failing one still fails the run rather than passing silently.
    let r = bed.run_with(true);
    assert_eq!(r.exit_code(), RunResult::EXIT_FAILED, "{r:?}");
    let report = bed.latest().unwrap();
    assert_eq!(report.outcome, Outcome::Failure);
    assert_eq!(
        result(&report, "failed-units").detail,
        "nothing was activated"
    );
}

#[test]
fn builtin_check_fails_only_for_units_that_failed_after_the_switch() {
    // A unit already failed before the switch does not count against the new system.
    let bed = bed("");
    bed.host.systemd.set(true);
    *bed.host.failed.borrow_mut() = set(&["old-broken.service"]);
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_UPDATED, "{r:?}");
    let report = bed.latest().unwrap();
    let builtin = result(&report, "failed-units");
    assert_eq!(builtin.result, CheckStatus::Passed, "{builtin:?}");
    assert!(
        builtin.detail.contains("1 had failed before"),
        "{builtin:?}"
    );

    // One that fails under the new system does, and is named.
    let bed = self::bed("");
    bed.host.systemd.set(true);
    *bed.host.failed.borrow_mut() = set(&["old-broken.service"]);
    bed.host
        .failed_under
        .borrow_mut()
        .insert("nixos-system-one".into(), set(&["db.service"]));
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_ROLLED_BACK, "{r:?}");
    let report = bed.latest().unwrap();
    let builtin = result(&report, "failed-units");
    assert_eq!(builtin.result, CheckStatus::Failed);
    assert_eq!(builtin.detail, "failed since the switch: db.service");
    assert_eq!(bed.host.running_name(), "nixos-system-old");
}

#[test]
fn checks_are_retried_until_the_window_closes() {
    let bed = bed(CHECKS);
    let log_text = std::cell::RefCell::new(Vec::new());
    let on_progress = |l: &str| log_text.borrow_mut().push(l.to_owned());
    let mut log = RunLog {
        text: String::new(),
        on_progress: &on_progress,
    };
    let settings = bed.cfg.settings();
    let queue = |states: &[&str]| {
        states
            .iter()
            .map(|s| s.to_string())
            .collect::<VecDeque<_>>()
    };

    // Still starting twice, then active: passes within a window, without pausing here.
    bed.host.unit_states.borrow_mut().insert(
        "web.service".into(),
        queue(&["activating", "activating", "active"]),
    );
    let results = checks::run(
        &bed.host,
        &settings.checks,
        &Baseline::Skip("test".into()),
        Duration::from_secs(60),
        Duration::ZERO,
        &mut log,
    );
    assert_eq!(results[1].result, CheckStatus::Passed, "{results:?}");
    let asked = bed
        .take_calls()
        .iter()
        .filter(|c| *c == "is-active web.service")
        .count();
    assert_eq!(asked, 3, "asked until it was active");
    assert!(
        log_text
            .borrow()
            .iter()
            .any(|l| l.contains("1 health check not passing yet")),
        "{:?}",
        log_text.borrow()
    );

    // Never leaves "activating": with no window left it fails with what it saw, once asked.
    bed.host
        .unit_states
        .borrow_mut()
        .insert("web.service".into(), queue(&["activating"]));
    let results = checks::run(
        &bed.host,
        &settings.checks,
        &Baseline::Skip("test".into()),
        Duration::ZERO,
        Duration::ZERO,
        &mut log,
    );
    assert_eq!(
        (results[1].result, results[1].detail.as_str()),
        (CheckStatus::Failed, "activating")
    );
    assert_eq!(
        checks::failures(&results).unwrap(),
        "health check failed: unit web.service (activating)"
    );
    // The others passed the first time and were not asked again.
    let calls = bed.take_calls();
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("GET")).count(),
        1,
        "{calls:?}"
    );
}

#[test]
fn boot_mode_runs_no_checks() {
    let bed = bed("mode = \"boot\"\nchecks = [ { command = [\"/bin/false\"] } ]\n");
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_UPDATED, "{r:?}");
    assert!(bed.latest().unwrap().checks.is_empty());
    assert!(!bed.take_calls().iter().any(|c| c.starts_with("command")));
}
