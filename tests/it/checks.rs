//! Health checks after activation, end to end: bento.toml's `checks` and `on_failure` travel
//! in the snapshot, the real agent builds and activates toy systems over the real sshd, and
//! a failing unit, a failing HTTP check and a failing command each roll back to the exact
//! previous system with a report naming the check; `on_failure = "keep"` keeps the new one.
//!
//! The test machine has no systemd as PID 1, so `systemctl` is a small shim put first on
//! the agent's PATH: it fakes the service manager's answer to `is-active` (what a unit
//! check asks), driven by which toy system the real `switch-to-configuration` activated
//! last (its hook writes the version into a file). Nix, sshd and the agent are all real.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bento::protocol::check::CheckStatus;
use bento::protocol::report::{Outcome, Report};

use crate::agent::{
    code, fleet, text, write_version, Machine, EXIT_FAILED, EXIT_ROLLED_BACK, EXIT_UPDATED,
};
use crate::common::bento;
use crate::common::sshd::Sshd;

fn script(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// The fixtures: the activation hook recording the running version, the `systemctl` shim,
/// and a probe command; all fail for version 2 ("the new system is broken").
struct Fixture {
    bin: PathBuf,
    hook: PathBuf,
    running: PathBuf,
}

impl Fixture {
    fn new(dir: &Path) -> Self {
        let bin = dir.join("check-bin");
        fs::create_dir_all(&bin).unwrap();
        let running = dir.join("running-version");
        let hook = dir.join("check-hook.sh");
        let r = running.display();
        script(
            &hook,
            &format!("case \"$1\" in switch|test) cat \"$2/nixos-version\" > {r} ;; esac\n"),
        );
        script(
            &bin.join("systemctl"),
            &format!(
                "# a stand-in for systemd's answer to `systemctl is-active -- UNIT`\n\
                 [ \"$1\" = is-active ] || {{ echo \"systemctl shim: $*\" >&2; exit 1; }}\n\
                 if [ \"$(cat {r})\" = 2 ]; then echo failed; exit 3; fi\necho active\n"
            ),
        );
        script(
            &bin.join("probe"),
            &format!(
                "if [ \"$(cat {r})\" = 2 ]; then echo 'probe: version 2 is broken' >&2; exit 4; fi\n"
            ),
        );
        Fixture { bin, hook, running }
    }

    fn update(&self, m: &Machine<'_>) -> std::process::Output {
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        m.update_with(
            &[
                ("BENTO_TEST_HOOK", self.hook.to_str().unwrap()),
                ("PATH", &path),
            ],
            &[],
        )
    }
}

/// A loopback HTTP endpoint answering 500 while version 2 runs, 200 otherwise; it stops
/// when dropped (and after two minutes in any case).
struct Health {
    url: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Health {
    fn start(running: PathBuf) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let url = format!("http://127.0.0.1:{}/health", l.local_addr().unwrap().port());
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(120);
            while !stopped.load(Ordering::Relaxed) && Instant::now() < end {
                let Ok((mut s, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf);
                let v = fs::read_to_string(&running).unwrap_or_default();
                let status = if v.trim() == "2" {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let _ = s.write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        Health {
            url,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// bento.toml as the harness wrote it, with `lines` added to `[hosts.alpha]` (the last table).
fn host_settings(sshd: &Sshd, base: &str, lines: &str) {
    fs::write(sshd.fleet().join("bento.toml"), format!("{base}{lines}")).unwrap();
}

fn check<'a>(r: &'a Report, name: &str) -> &'a bento::protocol::check::CheckResult {
    r.checks
        .iter()
        .find(|c| c.check == name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", r.checks))
}

#[test]
fn failing_unit_http_and_command_checks_roll_back_and_keep_keeps() {
    let sshd = Sshd::start(&["alpha"]);
    let base = fs::read_to_string(sshd.fleet().join("bento.toml")).unwrap();
    // The lines host_settings adds land in [hosts.alpha]: it is the last table.
    assert_eq!(base.rfind("\n["), base.find("\n[hosts.alpha]"), "{base}");
    let fx_dir = sshd.dir.join("checks");
    fs::create_dir_all(&fx_dir).unwrap();
    let fx = Fixture::new(&fx_dir);
    let health = Health::start(fx.running.clone());
    let probe = fx.bin.join("probe").display().to_string();
    let all = format!(
        "checks = [ {{ unit = \"web.service\" }}, {{ http = \"{}\", timeout = \"5s\" }}, {{ command = [\"{probe}\"] }} ]\n",
        health.url
    );
    // Version 1 passes every check.
    fleet(&sshd);
    host_settings(&sshd, &base, &all);
    sshd.publish();
    let m = Machine::new(&sshd, "alpha", "");
    let out = fx.update(&m);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let good = m.profile_target().unwrap();
    let r = m.latest_report();
    assert_eq!(r.outcome, Outcome::Success);
    assert_eq!(r.checks.len(), 4, "{:?}", r.checks);
    // No systemd here: the built-in check is skipped, and says so.
    assert_eq!(check(&r, "failed-units").result, CheckStatus::Skipped);
    assert_eq!(check(&r, "unit web.service").detail, "active");
    assert_eq!(
        check(&r, &format!("http {}", health.url)).detail,
        "HTTP 200"
    );
    assert_eq!(
        check(&r, &format!("command {probe}")).result,
        CheckStatus::Passed
    );

    // Version 2 is broken; one kind of check at a time notices (a new bento.toml is a new
    // version each time, so a rolled-back one does not hold the next back).
    write_version(&sshd, "2");
    for (lines, name, saw) in [
        (
            "checks = [ { unit = \"web.service\" } ]\n".to_owned(),
            "unit web.service".to_owned(),
            "failed".to_owned(),
        ),
        (
            format!("checks = [ {{ http = \"{}\" }} ]\n", health.url),
            format!("http {}", health.url),
            "HTTP 500".to_owned(),
        ),
        (
            format!("checks = [ {{ command = [\"{probe}\"] }} ]\n"),
            format!("command {probe}"),
            "exited with status 4: probe: version 2 is broken".to_owned(),
        ),
    ] {
        host_settings(&sshd, &base, &lines);
        sshd.publish();
        let before = m.activations().len();
        let out = fx.update(&m);
        assert_eq!(code(&out), EXIT_ROLLED_BACK, "{name}: {}", text(&out));
        // The failed check is a warning in the journal, not an info line (issue #24 item 11).
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("WARN") && l.contains(&format!("check {name}: FAILED"))),
            "{name}: {stderr}"
        );
        assert_eq!(
            m.profile_target().unwrap(),
            good,
            "{name}: back on the exact previous system"
        );
        let acts = m.activations();
        assert_eq!(acts.len(), before + 2, "{name}: {acts:?}");
        assert!(acts[before].contains("-alpha-2"), "{acts:?}");
        assert_eq!(acts[before + 1], format!("switch {good}"));
        // The report is on the server at once, names the check and what it saw.
        let r = m.latest_report();
        assert_eq!(r.outcome, Outcome::Rollback, "{name}");
        let error = r.error.clone().unwrap();
        assert!(
            error.starts_with(&format!("health check failed: {name} ({saw})")),
            "{error}"
        );
        let c = check(&r, &name);
        assert_eq!(
            (c.result, c.detail.as_str()),
            (CheckStatus::Failed, saw.as_str())
        );
        // `bento status` shows why.
        let status = bento()
            .args(["status", "--fleet"])
            .arg(sshd.fleet())
            .arg("--chroot")
            .arg(sshd.chroot())
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&status.stdout);
        assert!(
            shown.contains(&format!("health check failed: {name}")),
            "{shown}"
        );
    }

    // on_failure = "keep": the broken system stays (running and in the profile), the run
    // fails and says so.
    host_settings(
        &sshd,
        &base,
        &format!("on_failure = \"keep\"\nchecks = [ {{ command = [\"{probe}\"] }} ]\n"),
    );
    sshd.publish();
    let out = fx.update(&m);
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let kept = m.profile_target().unwrap();
    assert!(kept.contains("-alpha-2"), "{kept}");
    assert_eq!(m.activations().last().unwrap(), &format!("switch {kept}"));
    let r = m.latest_report();
    assert_eq!(r.outcome, Outcome::Failure);
    assert_eq!(r.system_after.as_deref(), Some(kept.as_str()));
    assert!(r.error.unwrap().contains("on_failure = \"keep\""));

    // A bad check never reaches a host: publish refuses bento.toml, naming the host and key.
    host_settings(
        &sshd,
        &base,
        "checks = [ { http = \"https://example.org/\" } ]\n",
    );
    let out = bento()
        .args(["publish", "--no-eval", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bento.toml") && err.contains("alpha") && err.contains("no TLS"),
        "{err}"
    );
}
