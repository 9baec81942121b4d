//! Following hosts from the command line (`publish --wait`, `trigger --wait`, `rollout`):
//! a progress bar on a terminal, one result line per host as it ends (unless `--json`),
//! and the exit status (0 only if every host succeeded). The decisions are `server::wait`.

use std::time::Duration;

use crate::protocol::layout::Chroot;
use crate::server::fleet::{Fleet, HostName};
use crate::server::wait::{self, Finished, Follow, Outcome, Tracker};
use crate::sys::output;

/// Time between two looks at the pending hosts' `logs/`.
pub const POLL: Duration = Duration::from_secs(1);
/// `--wait` without a value.
pub const DEFAULT_TIMEOUT: &str = "30m";

/// Parses `--wait=TIMEOUT` / `--wait-timeout` (`90s`, `30m`, `2h`).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// Each host with the id of its newest report now (what a retried run must outdo).
pub fn baselines(
    fleet: &Fleet,
    chroot: &Chroot,
    hosts: &[HostName],
) -> anyhow::Result<Vec<(HostName, Option<String>)>> {
    let store = super::select::store_of(fleet, chroot)?;
    Ok(hosts
        .iter()
        .map(|h| (h.clone(), wait::latest_report_id(&*store, h)))
        .collect())
}

/// One result line: `alpha  success  3f2a1b9c0d12` (and the error for the others).
pub fn format_line(f: &Finished, width: usize) -> String {
    let version = f.version.map_or_else(|| "-".repeat(12), |d| d.short());
    let mut line = format!(
        "{:width$}  {:11}  {version}",
        f.host.as_str(),
        f.outcome.word()
    );
    if let Some(e) = &f.error {
        line.push_str("  ");
        line.push_str(e);
    }
    line
}

/// Follows `tracker`'s hosts until each is decided, `timeout` passes, or (with
/// `stop_on_failure`) one fails.
pub fn follow(
    fleet: &Fleet,
    chroot: &Chroot,
    tracker: &mut Tracker,
    timeout: Duration,
    stop_on_failure: bool,
    lines: bool,
) -> anyhow::Result<()> {
    let width = tracker
        .pending()
        .iter()
        .map(|h| h.as_str().len())
        .max()
        .unwrap_or(0);
    let bar = output::progress(tracker.total() as u64, "waiting");
    bar.set_message(format!("for reports of {} hosts", tracker.pending().len()));
    let interval = |h: &HostName| fleet.config.interval(h);
    let mut on = |f: &Finished, t: &Tracker| {
        bar.inc(1);
        bar.set_message(format!("{} {}", f.host, f.outcome.word()));
        if lines {
            bar.suspend(|| output::line(&format_line(f, width)));
        }
        tracing::debug!("{} hosts still pending", t.pending().len());
    };
    let store = super::select::store_of(fleet, chroot)?;
    wait::follow(
        tracker,
        &Follow {
            store: &*store,
            chroot,
            interval: &interval,
            timeout,
            poll: POLL,
            stop_on_failure,
        },
        &mut on,
    );
    bar.finish_and_clear();
    Ok(())
}

/// True when every host ended in success.
pub fn all_succeeded(finished: &[Finished]) -> bool {
    finished.iter().all(|f| f.outcome == Outcome::Success)
}

/// `alpha, beta` for messages.
pub fn names<'a>(hosts: impl IntoIterator<Item = &'a HostName>) -> String {
    hosts
        .into_iter()
        .map(HostName::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A summary on stderr: `3 succeeded; failure: beta; timed-out: gamma`.
pub fn summary(finished: &[Finished]) {
    let ok = finished
        .iter()
        .filter(|f| f.outcome == Outcome::Success)
        .count();
    let mut parts = vec![format!("{ok} succeeded")];
    for o in [
        Outcome::Failure,
        Outcome::RolledBack,
        Outcome::Drifted,
        Outcome::TimedOut,
    ] {
        let hosts: Vec<&HostName> = finished
            .iter()
            .filter(|f| f.outcome == o)
            .map(|f| &f.host)
            .collect();
        if !hosts.is_empty() {
            parts.push(format!("{}: {}", o.word(), names(hosts)));
        }
    }
    tracing::info!("{}", parts.join("; "));
}

#[derive(serde::Serialize)]
struct AfterPublish<'a> {
    published: &'a [crate::server::publish::HostReport],
    hosts: &'a [Finished],
}

/// `publish --wait`: follows every host whose version is live (published or unchanged);
/// with `json`, prints the publish reports and the outcomes as one object. True when
/// every host succeeded.
pub fn after_publish(
    fleet: &Fleet,
    chroot: &Chroot,
    reports: &[crate::server::publish::HostReport],
    timeout: Duration,
    json: bool,
) -> anyhow::Result<bool> {
    let live: Vec<HostName> = reports
        .iter()
        .filter(|r| r.digest.is_some() && r.status != crate::server::publish::Status::Failed)
        .map(|r| r.host.clone())
        .collect();
    let mut tracker = Tracker::new(baselines(fleet, chroot, &live)?, false);
    follow(fleet, chroot, &mut tracker, timeout, false, !json)?;
    summary(&tracker.finished);
    if json {
        output::json(&AfterPublish {
            published: reports,
            hosts: &tracker.finished,
        })?;
    }
    Ok(all_succeeded(&tracker.finished))
}
