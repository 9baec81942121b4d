//! `bento log`: a host's history from the reports in its chroot, as a table (snapshot), as
//! JSON, and one run's full log; hostile entries shown, never followed or interpreted.

use std::fs;
use std::io::Write as _;

use bento::protocol::check::{CheckResult, CheckStatus};
use bento::protocol::layout::Chroot;
use bento::protocol::manifest::Digest;
use bento::protocol::report::{Outcome, Report, RunKind, Timings};
use bento::protocol::HostName;

use crate::common::{bento, ScratchDir};

struct Fixture {
    _scratch: ScratchDir,
    fleet: std::path::PathBuf,
    logs: std::path::PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let scratch = ScratchDir::new();
        let fleet = scratch.join("fleet");
        let chroot = Chroot::new(scratch.join("chroot"));
        fs::create_dir_all(&fleet).unwrap();
        fs::write(
            fleet.join("bento.toml"),
            format!(
                "[server]\nchroot = \"{}\"\n\n[hosts.alpha]\n[hosts.beta]\n",
                chroot.root.display()
            ),
        )
        .unwrap();
        let logs = chroot
            .host_dir(&HostName::new("alpha").unwrap())
            .join("logs");
        fs::create_dir_all(logs.join("reports")).unwrap();
        Self {
            _scratch: scratch,
            fleet,
            logs,
        }
    }

    fn report(&self, id: &str, minute: u32, outcome: Outcome, error: Option<&str>) {
        self.report_with(id, minute, outcome, error, Vec::new());
    }

    fn report_with(
        &self,
        id: &str,
        minute: u32,
        outcome: Outcome,
        error: Option<&str>,
        checks: Vec<CheckResult>,
    ) {
        let r = Report {
            format: 1,
            id: id.into(),
            host: HostName::new("alpha").unwrap(),
            kind: RunKind::Published,
            version: Digest::of(id.as_bytes()),
            previous_version: None,
            outcome,
            system_before: None,
            system_after: None,
            built_system: None,
            started: format!("2026-11-25T12:{minute:02}:00Z").parse().unwrap(),
            finished: format!("2026-11-25T12:{minute:02}:09Z").parse().unwrap(),
            timings: Timings {
                total_ms: 9_250,
                ..Default::default()
            },
            agent_version: "0.1.0".into(),
            error: error.map(str::to_owned),
            log_tail: String::new(),
            reboot_required: false,
            checks,
            clock_warning: None,
            clock_offset_s: None,
        };
        fs::write(self.logs.join(r.file_name()), r.to_bytes()).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        write!(gz, "run {id}\nstep one\n\x1b[2Jstep two\n").unwrap();
        fs::write(self.logs.join(r.log_file_name()), gz.finish().unwrap()).unwrap();
    }

    fn log(&self, args: &[&str]) -> assert_cmd::Command {
        let mut cmd = bento();
        cmd.arg("log").args(args).current_dir(&self.fleet);
        cmd
    }
}

#[test]
fn log_lists_runs_newest_first_with_outcome_and_error() {
    let f = Fixture::new();
    f.report("20261125T120000Z-00000001", 0, Outcome::Success, None);
    f.report(
        "20261125T121000Z-00000002",
        10,
        Outcome::Failure,
        Some("build failed: hosts/alpha/configuration.nix:3"),
    );
    f.report_with(
        "20261125T122000Z-00000003",
        20,
        Outcome::Rollback,
        Some("server unreachable after activation\x1b[31m"),
        vec![
            CheckResult {
                check: "failed-units".into(),
                result: CheckStatus::Passed,
                detail: "none".into(),
            },
            CheckResult {
                check: "unit nginx.service".into(),
                result: CheckStatus::Failed,
                detail: "failed".into(),
            },
        ],
    );
    let out = f
        .log(&["alpha"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(out).unwrap();
    assert!(
        !text.contains('\x1b'),
        "a host's escape sequence reached the terminal: {text:?}"
    );
    insta::assert_snapshot!("log_table", text);

    let out = f
        .log(&["alpha", "-n", "1", "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let runs: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["id"], "20261125T122000Z-00000003");
    assert_eq!(runs[0]["outcome"], "rollback");
    assert_eq!(runs[0]["duration_ms"], 9250);
    assert_eq!(runs[0]["has_log"], true);
    assert_eq!(
        runs[0]["checks"],
        serde_json::json!([
            {"check": "failed-units", "result": "passed", "detail": "none"},
            {"check": "unit nginx.service", "result": "failed", "detail": "failed"},
        ])
    );
    // A run without checks has an empty array, not a missing field.
    let out = f
        .log(&["alpha", "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let runs: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(runs[2]["id"], "20261125T120000Z-00000001");
    assert_eq!(runs[2]["checks"], serde_json::json!([]));
}

#[test]
fn log_prints_one_runs_full_log_and_names_a_missing_one() {
    let f = Fixture::new();
    f.report("20261125T120000Z-00000001", 0, Outcome::Success, None);
    let out = f
        .log(&["alpha", "20261125T120000Z-00000001"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with("run 20261125T120000Z-00000001\nstep one\n"),
        "{text}"
    );
    assert!(text.contains("\\u{1b}[2Jstep two"), "{text}");
    let err = f
        .log(&["alpha", "20261125T999999Z-deadbeef"])
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    let err = String::from_utf8(err).unwrap();
    assert!(
        err.contains("no run \"20261125T999999Z-deadbeef\"") && err.contains("alpha"),
        "{err}"
    );
}

#[test]
fn log_of_a_host_without_reports_or_unknown() {
    let f = Fixture::new();
    let out = f
        .log(&["beta", "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
        serde_json::json!([])
    );
    let err = f
        .log(&["gamma"])
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    assert!(String::from_utf8(err)
        .unwrap()
        .contains("no host named gamma"));
}
