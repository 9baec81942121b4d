//! Per-host settings from bento.toml on the machine: the reboot policy, the failure
//! notification hook, and the daily flake self-update — over the real sshd and Nix.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bento::protocol::report::{Outcome, RunKind};

use crate::agent::{code, fleet, text, Machine, EXIT_FAILED, EXIT_NOOP, EXIT_UPDATED};
use crate::common::sshd::Sshd;

/// Adds `lines` to `[hosts.HOST]` (or `[defaults]` when host is None) in bento.toml.
fn set(sshd: &Sshd, host: Option<&str>, lines: &str) {
    let toml = sshd.fleet().join("bento.toml");
    let text = fs::read_to_string(&toml).unwrap();
    let text = match host {
        Some(h) => text.replacen(
            &format!("[hosts.{h}]\n"),
            &format!("[hosts.{h}]\n{lines}"),
            1,
        ),
        None => format!("[defaults]\n{lines}{text}"),
    };
    fs::write(toml, text).unwrap();
}

fn recorder(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let script = dir.join(format!("{name}.sh"));
    let out = dir.join(format!("{name}.out"));
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$@\" >> {out}\ncat >> {out}\n",
            out = out.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    (script, out)
}

fn set_kernel(sshd: &Sshd, version: &str, kernel: &str) {
    fs::write(
        sshd.fleet().join("common/version.nix"),
        format!("{{ version = \"{version}\"; kernel = \"{kernel}\"; }}\n"),
    )
    .unwrap();
}

#[test]
fn a_new_kernel_reboots_after_the_report_when_the_policy_says_now() {
    let sshd = Sshd::start(&["alpha"]);
    set(&sshd, Some("alpha"), "reboot = \"when-needed-now\"\n");
    fleet(&sshd);
    let (reboot, rebooted) = recorder(&sshd.dir.path, "reboot");
    let m = Machine::new(
        &sshd,
        "alpha",
        &format!("reboot_command = [\"{}\", \"now\"]\n", reboot.display()),
    );

    // The settings traveled with the snapshot.
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    let settings: serde_json::Value = serde_json::from_slice(
        &fs::read(m.base.join("state/config/current/bento-host.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(settings["reboot"], "when-needed-now");
    assert!(
        !rebooted.exists(),
        "first install: nothing to compare, no reboot"
    );

    // Same kernel, new version: no reboot.
    set_kernel(&sshd, "2", "6.1.0");
    sshd.publish();
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    assert!(!rebooted.exists(), "same kernel: no reboot");

    // A new kernel: reboot, after the report reached the server.
    set_kernel(&sshd, "3", "6.1.1");
    sshd.publish();
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert_eq!(
        fs::read_to_string(&rebooted).unwrap().lines().next(),
        Some("now")
    );
    let report = m.latest_report();
    assert!(report.reboot_required);
    assert!(report.system_after.unwrap().contains("-alpha-3"));
    assert!(m.heartbeat().reboot_pending);
}

#[test]
fn when_needed_waits_for_its_time_and_never_means_never() {
    let sshd = Sshd::start(&["alpha"]);
    set(
        &sshd,
        None,
        "reboot = \"when-needed\"\nreboot_at = \"Sun 04:00\"\n",
    );
    fleet(&sshd);
    let (reboot, rebooted) = recorder(&sshd.dir.path, "reboot");
    let m = Machine::new(
        &sshd,
        "alpha",
        &format!("reboot_command = [\"{}\"]\n", reboot.display()),
    );
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    set_kernel(&sshd, "2", "6.1.1");
    sshd.publish();
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    assert!(!rebooted.exists(), "when-needed does not reboot now");
    assert!(m.latest_report().reboot_required);
    assert!(
        m.heartbeat().reboot_pending,
        "the host says a reboot is pending"
    );

    // `never`, set fleet-wide, is obeyed too.
    let toml = sshd.fleet().join("bento.toml");
    fs::write(
        &toml,
        fs::read_to_string(&toml)
            .unwrap()
            .replace("when-needed", "never"),
    )
    .unwrap();
    set_kernel(&sshd, "3", "6.1.2");
    sshd.publish();
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    assert!(!rebooted.exists());
}

#[test]
fn failures_run_the_notification_hook_with_the_report() {
    let sshd = Sshd::start(&["alpha"]);
    let (hook, notified) = recorder(&sshd.dir.path, "notify");
    set(
        &sshd,
        None,
        &format!("notify = [\"{}\", \"bento failed\"]\n", hook.display()),
    );
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    assert!(!notified.exists(), "no notice on success");

    fs::write(sshd.fleet().join("hosts/alpha/payload.txt"), "x\n").unwrap();
    fs::write(
        sshd.fleet().join("hosts/alpha/flake.nix"),
        "{ outputs = { self }: { nixosConfigurations.alpha = throw \"nope\"; }; }\n",
    )
    .unwrap();
    sshd.publish();
    assert_eq!(code(&m.update()), EXIT_FAILED);
    let text = fs::read_to_string(&notified).unwrap();
    let (args, json) = text.split_once('\n').unwrap();
    assert_eq!(args, "bento failed");
    let report =
        bento::protocol::report::Report::parse(json.as_bytes()).expect("the report on stdin");
    assert_eq!(report.outcome, Outcome::Failure);
    assert_eq!(report.id, m.latest_report().id);
    // The heartbeat still says when the host last succeeded.
    assert!(m.heartbeat().last_success.is_some());
}

#[test]
fn self_update_relocks_a_moved_input_and_reports_auto_updated() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    // alpha's flake takes its payload from a local input outside the fleet.
    let input = sshd.dir.join("upstream");
    fs::create_dir_all(&input).unwrap();
    fs::write(input.join("payload.txt"), "upstream 1\n").unwrap();
    let host = sshd.fleet().join("hosts/alpha");
    fs::write(
        host.join("flake.nix"),
        format!(
            r#"{{
  inputs.upstream = {{ url = "path:{}"; flake = false; }};
  outputs = {{ self, upstream }}:
    let lib = import ./common/lib.nix; in {{
      nixosConfigurations.alpha.config.system.build.toplevel = lib.mkSystem {{
        hostName = "alpha";
        payload = builtins.readFile "${{upstream}}/payload.txt";
      }};
    }};
}}
"#,
            input.display()
        ),
    )
    .unwrap();
    // Lock it the way a sysadmin would (without copying the host's secrets into the store).
    let lock = crate::common::bento()
        .arg("--fleet")
        .arg(sshd.fleet())
        .arg("flake-update")
        .output()
        .unwrap();
    assert!(
        lock.status.success(),
        "{}",
        String::from_utf8_lossy(&lock.stderr)
    );
    assert!(host.join("flake.lock").is_file());
    set(&sshd, Some("alpha"), "self_update = true\n");
    sshd.publish();
    let m = Machine::new(&sshd, "alpha", "");
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    let published_system = m.profile_target().unwrap();

    // The input moves; nothing new is published: the host re-locks and rebuilds itself.
    fs::write(input.join("payload.txt"), "upstream 2\n").unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let report = m.latest_report();
    assert_eq!(report.kind, RunKind::AutoUpdated);
    assert_eq!(report.outcome, Outcome::Success);
    let system = m.profile_target().unwrap();
    assert_ne!(system, published_system);
    assert_eq!(
        fs::read_to_string(Path::new(&system).join("payload"))
            .unwrap()
            .trim_end(),
        "upstream 2"
    );
    let hb = m.heartbeat();
    assert!(hb.auto_updated, "{hb:?}");
    assert!(hb.version.is_some());

    // At most daily: the next run is a plain no-op.
    let out = m.update();
    assert_eq!(code(&out), EXIT_NOOP, "{}", text(&out));
}
