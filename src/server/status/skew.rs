//! Clock skew: what a host's own stamps (its heartbeat's `time`, its report's `finished`)
//! say against when the server received the file (the store's modification time, by the
//! server's clock). Liveness is judged by the latter, so a host with a wrong clock is
//! flagged as skewed, never as silent.

use std::time::SystemTime;

use crate::protocol::report::{HEARTBEAT_FILE, LATEST_FILE};
use crate::protocol::HostName;
use crate::server::store::Store;

use super::state::Facts;

/// A skew beyond this is worth saying: agents' and servers' clocks are NTP-synced, and a
/// run takes a while between its stamp and its upload.
pub const NOTEWORTHY_SKEW_S: i64 = 5 * 60;

/// When the server received the host's newest heartbeat or report.
pub fn received(store: &dyn Store, host: &HostName) -> Option<SystemTime> {
    store
        .list_logs(host, None)
        .ok()?
        .into_iter()
        .filter(|e| e.refused.is_none() && (e.name == HEARTBEAT_FILE || e.name == LATEST_FILE))
        .filter_map(|e| e.modified)
        .max()
}

/// The host's clock minus the server's, in seconds: its newest stamp against `received`.
pub fn skew(facts: &Facts<'_>, received: Option<SystemTime>) -> Option<i64> {
    let received = received?;
    let stamp = super::state::last_seen(facts)?;
    let secs = |t: SystemTime| -> i64 {
        match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }
    };
    Some(secs(stamp) - secs(received))
}

/// What the row says about a skew worth saying.
pub fn note(skew_s: i64) -> Option<String> {
    (skew_s.abs() > NOTEWORTHY_SKEW_S).then(|| {
        let d = super::state::short_duration(std::time::Duration::from_secs(skew_s.unsigned_abs()));
        let side = if skew_s > 0 { "ahead of" } else { "behind" };
        format!(
            "clock skew: the host's clock is {d} {side} the server's (its stamps against when the server received them); liveness is judged by the server's clock: fix the host's time (NTP)"
        )
    })
}

/// What the row says when the host's agent corrected its clock by the store's (`offset`:
/// the server's time minus the host's).
pub fn offset_note(offset: i64) -> String {
    let d = super::state::short_duration(std::time::Duration::from_secs(offset.unsigned_abs()));
    let side = if offset > 0 { "behind" } else { "ahead of" };
    format!(
        "clock corrected: the host's agent found its clock {d} {side} the store's and signs its requests with the store's time (clock_offset_s {offset:+})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_skew_of_minutes_is_noted_with_its_direction() {
        assert_eq!(note(60), None);
        assert_eq!(note(-NOTEWORTHY_SKEW_S), None);
        let behind = note(-3 * 3600).unwrap();
        assert!(
            behind.contains("clock skew") && behind.contains("3h behind"),
            "{behind}"
        );
        assert!(note(3 * 3600).unwrap().contains("3h ahead of"));
    }

    #[test]
    fn a_corrected_offset_says_which_way_the_hosts_clock_is_off() {
        // The server 3 h ahead of the host: the host's clock is behind.
        let n = offset_note(3 * 3600);
        assert!(n.contains("3h behind") && n.contains("+10800"), "{n}");
        assert!(
            offset_note(-120).contains("2m ahead of"),
            "{}",
            offset_note(-120)
        );
    }
}
