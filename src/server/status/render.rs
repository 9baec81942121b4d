//! Turning status rows into text: the aligned table (colour only when asked, i.e. on a
//! terminal), and the node-exporter textfile for Prometheus. Pure: rows and `now` in, text out.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::SystemTime;

use rayon::prelude::*;

use super::collect::HostStatus;
use super::state::{short_duration, State};
use crate::nix::StorePath;
use crate::sys::terminal::escape;

const HEADERS: [&str; 7] = [
    "HOST",
    "STATE",
    "PUBLISHED",
    "EXPECTED",
    "RUNNING",
    "LAST SEEN",
    "ERROR",
];

fn ago(t: Option<SystemTime>, now: SystemTime) -> String {
    match t {
        Some(t) => match now.duration_since(t) {
            Ok(d) => format!("{} ago", short_duration(d)),
            // A clock ahead of ours: say so rather than print a negative age.
            Err(e) => format!("in {}", short_duration(e.duration())),
        },
        None => "never".to_owned(),
    }
}

fn short_system(p: Option<&str>) -> String {
    match p {
        Some(p) => {
            StorePath::new(p).map_or_else(|_| "?".to_owned(), |s| s.short_hash(8).to_owned())
        }
        None => "-".to_owned(),
    }
}

/// The cells of one row, uncoloured.
fn cells(row: &HostStatus, now: SystemTime) -> [String; 7] {
    let published = match &row.published {
        Some(d) => format!("{} {}", d.short(), ago(row.published_time, now)),
        None => "-".to_owned(),
    };
    // Every cell is escaped: the error column quotes what hosts wrote, and nothing a host
    // wrote may reach the terminal as a control sequence (it could redraw other rows).
    [
        row.host.to_string(),
        row.state.label().to_owned(),
        published,
        short_system(row.expected_system.as_ref().map(StorePath::as_str)),
        short_system(row.running_system.as_deref()),
        ago(row.last_seen_at, now),
        notes(row),
    ]
    .map(|cell| match escape(&cell) {
        Cow::Borrowed(_) => cell,
        Cow::Owned(escaped) => escaped,
    })
}

/// The last column: the error, then what the heartbeat says a person should know.
fn notes(row: &HostStatus) -> String {
    let mut parts: Vec<&str> = row.error.as_deref().into_iter().collect();
    if row.reboot_pending {
        parts.push("reboot pending");
    }
    // Only a heartbeat that says so: an agent older than the field may well verify.
    if row.verifies_signatures == Some(false) {
        parts.push("signatures not verified (no trusted_keys)");
    }
    parts.join("; ")
}

fn colour(state: State) -> &'static str {
    match state {
        State::Unknown | State::Failing | State::RolledBack | State::Silent | State::Stale => {
            "\x1b[1;31m"
        }
        State::Drifted | State::UpdatePending => "\x1b[33m",
        State::New | State::Held => "\x1b[36m",
        State::UpToDate => "\x1b[32m",
    }
}

/// The table: a header and one row per host, columns aligned with spaces. With `color`,
/// the state is coloured (ANSI); the text is otherwise the same, so alignment never depends
/// on escape codes.
pub fn table(rows: &[HostStatus], now: SystemTime, color: bool) -> String {
    // A row's cells are most of the work of a 10,000-host table.
    let all: Vec<[String; 7]> = rows.par_iter().map(|r| cells(r, now)).collect();
    let mut widths = HEADERS.map(str::len);
    for c in &all {
        for (w, cell) in widths.iter_mut().zip(c) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String; 7], state: Option<State>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let last = i == cells.len() - 1;
            if last && cell.is_empty() {
                break;
            }
            let pad = if last {
                0
            } else {
                widths[i] - cell.chars().count()
            };
            match (i, state, color) {
                (1, Some(s), true) => {
                    let _ = write!(text, "{}{cell}\x1b[0m", colour(s));
                }
                _ => text.push_str(cell),
            }
            if !last {
                text.extend(std::iter::repeat_n(' ', pad + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&HEADERS.map(str::to_owned), None);
    for (c, r) in all.iter().zip(rows) {
        line(c, Some(r.state));
    }
    out
}

/// `5 hosts: 3 up to date, 1 failing, 1 silent`.
pub fn summary(rows: &[HostStatus]) -> String {
    let parts: Vec<String> = State::ALL
        .iter()
        .filter_map(|s| {
            let n = rows.iter().filter(|r| r.state == *s).count();
            (n > 0).then(|| format!("{n} {}", s.label()))
        })
        .collect();
    let hosts = if rows.len() == 1 { "host" } else { "hosts" };
    if parts.is_empty() {
        format!("{} {hosts}", rows.len())
    } else {
        format!("{} {hosts}: {}", rows.len(), parts.join(", "))
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The node-exporter textfile: one `bento_host_state` series per host and state (1 for the
/// state it is in), last seen and last success times, and per-state host counts.
pub fn prometheus(rows: &[HostStatus]) -> String {
    let mut out = String::new();
    out.push_str("# HELP bento_host_state Whether the host is in this state (1) or not (0).\n");
    out.push_str("# TYPE bento_host_state gauge\n");
    for r in rows {
        let host = escape_label(r.host.as_str());
        for s in State::ALL {
            let v = u8::from(r.state == s);
            let _ = writeln!(
                out,
                "bento_host_state{{host=\"{host}\",state=\"{}\"}} {v}",
                s.key()
            );
        }
    }
    timestamps(
        &mut out,
        rows,
        "bento_host_last_seen_timestamp_seconds",
        "When the host last sent a heartbeat or report.",
        |r| r.last_seen_at,
    );
    timestamps(
        &mut out,
        rows,
        "bento_host_last_success_timestamp_seconds",
        "When the host's newest report, a success, finished.",
        |r| r.last_success_at,
    );
    flags(
        &mut out,
        rows,
        "bento_host_reboot_pending",
        "Whether the host's applied system waits for a reboot (new kernel or initrd).",
        |r| Some(r.reboot_pending),
    );
    flags(
        &mut out,
        rows,
        "bento_host_verifies_signatures",
        "Whether the host's agent checks manifest signatures (absent: it does not say).",
        |r| r.verifies_signatures,
    );
    let metric = "bento_host_clock_skew_seconds";
    let _ = writeln!(
        out,
        "# HELP {metric} The host's clock minus the server's (its stamps against when the server received them).\n# TYPE {metric} gauge"
    );
    for r in rows {
        if let Some(v) = r.clock_skew_s {
            let _ = writeln!(
                out,
                "{metric}{{host=\"{}\"}} {v}",
                escape_label(r.host.as_str())
            );
        }
    }
    flags(
        &mut out,
        rows,
        "bento_host_unreadable",
        "Whether some of the host's files could not be read, so its state is not known.",
        |r| Some(r.unreadable),
    );
    out.push_str("# HELP bento_hosts Number of hosts in each state.\n");
    out.push_str("# TYPE bento_hosts gauge\n");
    for s in State::ALL {
        let n = rows.iter().filter(|r| r.state == s).count();
        let _ = writeln!(out, "bento_hosts{{state=\"{}\"}} {n}", s.key());
    }
    out
}

/// One 0/1 gauge, a series per host for which the flag is known.
fn flags(
    out: &mut String,
    rows: &[HostStatus],
    metric: &str,
    help: &str,
    flag: fn(&HostStatus) -> Option<bool>,
) {
    let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
    for r in rows {
        if let Some(v) = flag(r) {
            let _ = writeln!(
                out,
                "{metric}{{host=\"{}\"}} {}",
                escape_label(r.host.as_str()),
                u8::from(v)
            );
        }
    }
}

/// One gauge of unix times, a series per host that has the time.
fn timestamps(
    out: &mut String,
    rows: &[HostStatus],
    metric: &str,
    help: &str,
    time: fn(&HostStatus) -> Option<SystemTime>,
) {
    let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
    for r in rows {
        if let Some(t) = time(r) {
            let _ = writeln!(
                out,
                "{metric}{{host=\"{}\"}} {}",
                escape_label(r.host.as_str()),
                unix_seconds(t)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::HostName;
    use std::time::Duration;

    fn row(host: &str, state: State, error: Option<&str>) -> HostStatus {
        HostStatus {
            host: HostName::new(host).unwrap(),
            state,
            published: Some(crate::protocol::manifest::Digest::of(b"x")),
            published_at: None,
            expected_system: None,
            expected_from: None,
            running_system: Some("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x".into()),
            running_version: None,
            last_seen: None,
            last_success: None,
            error: error.map(str::to_owned),
            reboot_pending: false,
            verifies_signatures: None,
            clock_skew_s: None,
            clock_offset_s: None,
            formats: None,
            unreadable: false,
            last_seen_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1000)),
            last_success_at: None,
            published_time: Some(SystemTime::UNIX_EPOCH),
        }
    }

    #[test]
    fn reboot_pending_and_unverified_signatures_are_flagged() {
        let mut rows = [
            row("a", State::Failing, Some("boom")),
            row("b", State::UpToDate, None),
            row("c", State::UpToDate, None),
            row(
                "d",
                State::New,
                Some("/srv/bento/d/current: Permission denied"),
            ),
        ];
        rows[0].reboot_pending = true;
        rows[0].verifies_signatures = Some(false);
        rows[1].verifies_signatures = Some(true);
        rows[3].unreadable = true;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1060);
        let text = table(&rows, now, false);
        let line = |host: &str| text.lines().find(|l| l.starts_with(host)).unwrap();
        assert!(
            line("a ").ends_with("boom; reboot pending; signatures not verified (no trusted_keys)"),
            "{text}"
        );
        // Verifying, or not saying (an older agent): nothing to flag.
        assert!(line("b ").ends_with("ago"), "{text}");
        assert!(line("c ").ends_with("ago"), "{text}");

        let prom = prometheus(&rows);
        for series in [
            "bento_host_reboot_pending{host=\"a\"} 1",
            "bento_host_reboot_pending{host=\"b\"} 0",
            "bento_host_verifies_signatures{host=\"a\"} 0",
            "bento_host_verifies_signatures{host=\"b\"} 1",
            "bento_host_unreadable{host=\"d\"} 1",
            "bento_host_unreadable{host=\"a\"} 0",
        ] {
            assert!(prom.lines().any(|l| l == series), "{series} in\n{prom}");
        }
        assert!(!prom.contains("bento_host_verifies_signatures{host=\"c\"}"));
    }

    #[test]
    fn colour_does_not_change_alignment() {
        let rows = [
            row("a", State::Failing, Some("boom")),
            row("bbbbbb", State::UpToDate, None),
        ];
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1060);
        let plain = table(&rows, now, false);
        let coloured = table(&rows, now, true);
        assert!(!plain.contains('\x1b'));
        let stripped = coloured
            .replace("\x1b[1;31m", "")
            .replace("\x1b[32m", "")
            .replace("\x1b[0m", "");
        assert_eq!(plain, stripped);
        let lines: Vec<&str> = plain.lines().collect();
        let col = |l: &str| l.find("LAST SEEN").or_else(|| l.find("60s ago")).unwrap();
        assert_eq!(col(lines[0]), col(lines[1]));
        assert_eq!(col(lines[0]), col(lines[2]));
        assert!(lines[1].ends_with("boom"));
        assert_eq!(summary(&rows), "2 hosts: 1 failing, 1 up to date");
    }
}
