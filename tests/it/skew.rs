//! Issue #24 item 6: a host whose clock is hours off is judged by when the server received
//! its files, never `silent` while it reports; `bento status` shows the clock skew in the
//! row, as `clock_skew_s` in `--json` and as a Prometheus gauge; the agent warns about a
//! manifest stamped in its future. The agent runs for real,
//! its clock moved by libfaketime (installed by scripts/test.sh).

use std::path::PathBuf;

use crate::agent::{code, fleet, text, Machine, EXIT_UPDATED};
use crate::common::bento;
use crate::common::sshd::Sshd;

/// libfaketime's preload library, wherever Debian put it for this architecture.
pub(crate) fn libfaketime() -> PathBuf {
    glob_one("/usr/lib", "faketime/libfaketime.so.1")
        .expect("libfaketime is installed (scripts/test.sh installs faketime)")
}

fn glob_one(base: &str, tail: &str) -> Option<PathBuf> {
    std::fs::read_dir(base)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(tail))
        .find(|p| p.exists())
}

fn status_json(sshd: &Sshd) -> serde_json::Value {
    let out = bento()
        .args(["status", "--json", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn an_agent_hours_off_is_live_and_flagged_as_skewed() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    let lib = libfaketime();
    for (offset, sign) in [("-3h", -1i64), ("+3h", 1)] {
        let out = m.update_with(
            &[
                ("LD_PRELOAD", lib.to_str().unwrap()),
                ("FAKETIME", offset),
                ("DONT_FAKE_MONOTONIC", "1"),
            ],
            &[],
        );
        assert!(
            [0, EXIT_UPDATED].contains(&code(&out)),
            "{offset}: {}",
            text(&out)
        );
        if sign < 0 {
            // The manifest, stamped by the server's clock, is 3 h in this agent's future.
            assert!(text(&out).contains("clock is behind"), "{}", text(&out));
            // At WARN in the log, and in the report the server keeps.
            assert!(
                text(&out)
                    .lines()
                    .any(|l| l.contains("WARN") && l.contains("clock is behind")),
                "{}",
                text(&out)
            );
            let report = m.latest_report();
            assert!(
                report
                    .clock_warning
                    .as_deref()
                    .is_some_and(|w| w.contains("clock is behind")),
                "{report:?}"
            );
        }
        assert_eq!(
            m.heartbeat().time.system_time() < std::time::SystemTime::now(),
            sign < 0,
            "the heartbeat carries the agent's own clock"
        );
        let rows = status_json(&sshd);
        let row = &rows[0];
        assert_eq!(row["state"], "up-to-date", "{offset}: {row}");
        let skew = row["clock_skew_s"].as_i64().unwrap();
        assert!(
            (skew - sign * 3 * 3600).abs() < 300,
            "{offset}: skew {skew}: {row}"
        );
        let error = row["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("clock skew")
                && error.contains(if sign < 0 { "3h behind" } else { "3h ahead of" }),
            "{offset}: {row}"
        );
        // The row's last seen is the server's receive time, not a time 3 h off.
        let seen = humantime::parse_rfc3339(row["last_seen"].as_str().unwrap()).unwrap();
        let off = std::time::SystemTime::now()
            .duration_since(seen)
            .unwrap_or_default();
        assert!(off.as_secs() < 300, "{offset}: last seen {seen:?}");
    }

    // The Prometheus gauge.
    let prom = sshd.dir.join("bento.prom");
    let out = bento()
        .args(["status", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .arg("--prometheus")
        .arg(&prom)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&prom).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("bento_host_clock_skew_seconds{host=\"alpha\"}"))
        .unwrap_or_else(|| panic!("{text}"));
    let v: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((v - 3 * 3600).abs() < 300, "{line}");
}
