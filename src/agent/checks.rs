//! Health checks after activation, before an update counts as a success: the built-in one
//! (no systemd unit failed that had not failed before the switch) and the configured ones
//! (`checks` in the host's settings: a unit is active, an HTTP GET answers 2xx, a command
//! exits 0), each asked through the [`Host`] seam and retried until a deadline.
//!
//! Invariant: every check ends with a recorded result — passed, failed with what it saw, or
//! skipped with why (the built-in check where systemd is not the service manager): a check
//! is never counted as passed without having been run.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::host::Host;
use super::outcome::RunLog;
use crate::protocol::check::{self, Check, CheckKind, CheckResult, CheckStatus};

/// Pause between rounds of checks that have not passed yet.
pub const RETRY: Duration = Duration::from_secs(2);

/// What the built-in check compares against: the failed units before the switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Baseline {
    Failed(BTreeSet<String>),
    /// The built-in check cannot run, and why.
    Skip(String),
}

impl Baseline {
    /// The failed units now, taken right before activation.
    pub fn before_switch(host: &dyn Host) -> Self {
        match host.failed_units() {
            Some(Ok(units)) => Baseline::Failed(units),
            Some(Err(e)) => Baseline::Skip(format!(
                "cannot list the failed units before the switch: {e}"
            )),
            None => Baseline::Skip("systemd is not the service manager here".into()),
        }
    }
}

/// Runs every check, re-running those not passing every `pause` until `window` is over
/// (each at least once); returns their results, the built-in one first.
pub fn run(
    host: &dyn Host,
    checks: &[Check],
    baseline: &Baseline,
    window: Duration,
    pause: Duration,
    log: &mut RunLog<'_>,
) -> Vec<CheckResult> {
    let deadline = Instant::now() + window;
    let mut results: Vec<CheckResult> = Vec::with_capacity(checks.len() + 1);
    results.push(CheckResult {
        check: check::BUILTIN.into(),
        result: CheckStatus::Failed,
        detail: String::new(),
    });
    results.extend(checks.iter().map(|c| CheckResult {
        check: c.to_string(),
        result: CheckStatus::Failed,
        detail: String::new(),
    }));
    if let Baseline::Skip(why) = baseline {
        results[0].result = CheckStatus::Skipped;
        results[0].detail = why.clone();
    }
    log.step(&format!(
        "running {} health check{}",
        checks.len() + 1,
        if checks.is_empty() { "" } else { "s" }
    ));
    loop {
        for (i, r) in results.iter_mut().enumerate() {
            if r.result != CheckStatus::Failed {
                continue;
            }
            let (passed, detail) = match i {
                0 => builtin(host, baseline),
                _ => evaluate(host, &checks[i - 1]),
            };
            r.detail = detail;
            if passed {
                r.result = CheckStatus::Passed;
            }
        }
        let pending = results
            .iter()
            .filter(|r| r.result == CheckStatus::Failed)
            .count();
        let left = deadline.saturating_duration_since(Instant::now());
        if pending == 0 || left.is_zero() {
            break;
        }
        log.step(&format!(
            "{pending} health check{} not passing yet; trying again for up to {}",
            if pending == 1 { "" } else { "s" },
            humantime::format_duration(Duration::from_secs(left.as_secs()))
        ));
        std::thread::sleep(pause.min(left));
    }
    for r in &results {
        let word = match r.result {
            CheckStatus::Passed => "passed",
            CheckStatus::Failed => "FAILED",
            CheckStatus::Skipped => "skipped",
        };
        let line = format!("check {}: {word} ({})", r.check, r.detail);
        match r.result {
            CheckStatus::Failed => log.warn(&line),
            _ => log.step(&line),
        }
    }
    results
}

/// Units failed now that had not failed before the switch.
fn builtin(host: &dyn Host, baseline: &Baseline) -> (bool, String) {
    let Baseline::Failed(before) = baseline else {
        return (true, String::new());
    };
    match host.failed_units() {
        Some(Ok(now)) => {
            let new: Vec<&str> = now.difference(before).map(String::as_str).collect();
            if new.is_empty() {
                let already = if now.is_empty() {
                    String::new()
                } else {
                    format!(" ({} had failed before it)", now.len())
                };
                (true, format!("no unit failed since the switch{already}"))
            } else {
                (
                    false,
                    format!("failed since the switch: {}", new.join(", ")),
                )
            }
        }
        Some(Err(e)) => (false, format!("cannot list the failed units: {e}")),
        None => (false, "systemd stopped being the service manager".into()),
    }
}

fn evaluate(host: &dyn Host, c: &Check) -> (bool, String) {
    let timeout = c.timeout();
    match &c.kind {
        CheckKind::Unit(unit) => match host.unit_state(unit, timeout) {
            Ok(state) => (state == "active", state),
            Err(e) => (false, e),
        },
        CheckKind::Http(url) => match host.http_get(url, timeout) {
            Ok(code) => ((200..300).contains(&code), format!("HTTP {code}")),
            Err(e) => (false, e),
        },
        CheckKind::Command(argv) => match host.run_check_command(argv, timeout) {
            Ok(said) if said.is_empty() => (true, "exited with status 0".into()),
            Ok(said) => (true, format!("exited with status 0: {said}")),
            Err(e) => (false, e),
        },
    }
}

/// The failed checks, as one line for a report's `error`.
pub fn failures(results: &[CheckResult]) -> Option<String> {
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r.result == CheckStatus::Failed)
        .map(|r| format!("{} ({})", r.check, r.detail))
        .collect();
    (!failed.is_empty()).then(|| format!("health check failed: {}", failed.join("; ")))
}
