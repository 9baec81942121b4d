//! Rollouts from the server (#13) end to end, over the real sshd and real Nix with toy
//! systems: waves halting at a failing canary and resumed after a fix, `bento trigger`
//! through a test trigger command that runs each host's agent, `bento rollback`, and
//! `hold = true`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::agent::{code, fleet, text, write_version, Machine, EXIT_UPDATED};
use crate::common::bento;
use crate::common::sshd::Sshd;

/// Every bento command of these tests is bounded.
const LIMIT: Duration = Duration::from_secs(300);

fn toy_nixpkgs() -> String {
    format!(
        "nixpkgs={}",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/toy/nixpkgs")
            .display()
    )
}

/// Runs `bento ARGS --fleet … [--chroot …]` for this sshd's fleet.
fn run(sshd: &Sshd, args: &[&str], chroot: bool) -> Output {
    let mut cmd = bento();
    cmd.args(args)
        .arg("--fleet")
        .arg(sshd.fleet())
        .env("NIX_PATH", toy_nixpkgs())
        .timeout(LIMIT);
    if chroot {
        cmd.arg("--chroot").arg(sshd.chroot());
    }
    cmd.output().expect("run bento")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Edits bento.toml: `server` lines go under `[server]`, `hosts` lines under
/// `[hosts.NAME]`, `tail` at the end.
pub(crate) fn configure(sshd: &Sshd, server: &str, hosts: &[(&str, &str)], tail: &str) {
    let path = sshd.fleet().join("bento.toml");
    let mut text = fs::read_to_string(&path).unwrap();
    text = text.replacen("[server]\n", &format!("[server]\n{server}"), 1);
    for (h, lines) in hosts {
        text = text.replacen(
            &format!("[hosts.{h}]\n"),
            &format!("[hosts.{h}]\n{lines}"),
            1,
        );
    }
    text.push_str(tail);
    fs::write(path, text).unwrap();
}

/// A trigger command for tests: runs `bento agent update` for the machine of `{host}`
/// (with `--force` when bento passes BENTO_TRIGGER_RETRY=1). `down-HOST` in the test dir
/// makes it fail as an unreachable ssh would; `fail-HOST` makes the host's activation fail.
pub(crate) fn trigger_command(sshd: &Sshd) -> String {
    let script = sshd.dir.join("trigger.sh");
    let dir = sshd.dir.path.display();
    let bento = assert_cmd::cargo::cargo_bin("bento");
    fs::write(
        &script,
        format!(
            r#"#!/bin/sh
host=$1
[ -e {dir}/down-$host ] && {{ echo "ssh: connect to host $host: Connection refused" >&2; exit 255; }}
force=
[ "$BENTO_TRIGGER_RETRY" = 1 ] && force=--force
[ -e {dir}/fail-$host ] && export BENTO_TEST_FAIL_ACTIVATION=1
BENTO_TEST_ACTIVATION_LOG={dir}/machine-$host/activations.log {bento} agent update --config {dir}/machine-$host/agent.toml $force >> {dir}/machine-$host/trigger.log 2>&1
exit 0
"#,
            bento = bento.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "trigger_command = [\"{}\", \"{{host}}\"]\n",
        script.display()
    )
}

fn live(sshd: &Sshd, host: &str) -> String {
    fs::read_to_string(sshd.host_dir(host).join("current")).unwrap()
}

pub(crate) fn status_json(sshd: &Sshd) -> Vec<serde_json::Value> {
    let out = run(sshd, &["status", "--json"], true);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

pub(crate) fn row<'a>(rows: &'a [serde_json::Value], host: &str) -> &'a serde_json::Value {
    rows.iter().find(|r| r["host"] == host).expect("host row")
}

/// A fleet of `hosts` on version 1, every machine updated to it.
fn fleet_on_v1<'a>(sshd: &'a Sshd) -> Vec<Machine<'a>> {
    fleet(sshd);
    sshd.hosts
        .iter()
        .map(|h| {
            let m = Machine::new(sshd, h, "");
            let out = m.update();
            assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
            m
        })
        .collect()
}

fn runs(m: &Machine<'_>, version: &str) -> bool {
    m.profile_target()
        .is_some_and(|p| p.ends_with(&format!("-{}-{version}", m.host)))
}

#[test]
fn a_failing_canary_halts_the_rollout_and_resume_finishes_it_after_the_fix() {
    let sshd = Sshd::start(&["alpha", "beta", "gamma"]);
    let machines = fleet_on_v1(&sshd);
    configure(
        &sshd,
        &trigger_command(&sshd),
        &[("alpha", "tags = [\"canary\"]\n")],
        "\n[rollout]\nwaves = [\"@canary\", \"100%\"]\n",
    );
    let hosts = ["alpha", "beta", "gamma"];
    let before: Vec<String> = hosts.iter().map(|h| live(&sshd, h)).collect();

    // Version 2 everywhere, but the canary's configuration does not evaluate.
    write_version(&sshd, "2");
    let flake = sshd.fleet().join("hosts/alpha/flake.nix");
    let good = fs::read_to_string(&flake).unwrap();
    // (the host list still evaluates; the canary's system does not, so the wave's publish
    // holds it back, as `bento publish` does).
    fs::write(
        &flake,
        "{ outputs = { self }: { nixosConfigurations.alpha.config.system.build.toplevel = throw \"broken canary\"; }; }\n",
    )
    .unwrap();

    let out = run(
        &sshd,
        &["rollout", "--trigger", "--wait-timeout", "120s"],
        true,
    );
    assert_eq!(code(&out), 1, "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("halted at wave 1/2")
            && err.contains("publishing alpha failed")
            && err.contains("broken canary"),
        "{}",
        text(&out)
    );
    // Nobody saw version 2: not published, still running version 1.
    let after: Vec<String> = hosts.iter().map(|h| live(&sshd, h)).collect();
    assert_eq!(after, before);
    assert!(
        machines.iter().all(|m| runs(m, "1")),
        "every host still on 1"
    );
    let progress: serde_json::Value =
        serde_json::from_slice(&fs::read(sshd.chroot().join(".bento/rollout.json")).unwrap())
            .unwrap();
    assert_eq!(progress["phase"], "halted");
    assert_eq!(progress["halt"]["hosts"], serde_json::json!(["alpha"]));
    // Status says who the rollout holds back, and shows tags.
    let rows = status_json(&sshd);
    assert_eq!(row(&rows, "alpha")["tags"], serde_json::json!(["canary"]));
    let note = row(&rows, "beta")["held_back"].as_str().unwrap().to_owned();
    assert!(note.contains("halted at wave 1/2"), "{note}");

    // Fixed: resume publishes the canary again, then every host.
    fs::write(&flake, good).unwrap();
    let out = run(&sshd, &["rollout", "--resume", "--trigger", "--json"], true);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["phase"], "done");
    assert!(machines.iter().all(|m| runs(m, "2")), "every host on 2");
    let rows = status_json(&sshd);
    assert!(
        rows.iter()
            .all(|r| r["state"] == "up-to-date" && r["held_back"].is_null()),
        "{rows:?}"
    );
    // Nothing left to resume.
    let out = run(&sshd, &["rollout", "--resume"], true);
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no halted or interrupted rollout"));
}

#[test]
fn trigger_starts_the_selected_hosts_and_wait_returns_their_outcome() {
    let sshd = Sshd::start(&["alpha", "beta"]);
    let machines = fleet_on_v1(&sshd);
    configure(&sshd, &trigger_command(&sshd), &[], "");
    write_version(&sshd, "2");
    sshd.publish();

    // Only the selected host runs.
    let out = run(
        &sshd,
        &["trigger", "--on", "al*", "--wait=120s", "--json"],
        true,
    );
    assert_eq!(code(&out), 0, "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["triggered"].as_array().unwrap().len(), 1);
    assert_eq!(json["hosts"][0]["host"], "alpha");
    assert_eq!(json["hosts"][0]["outcome"], "success");
    assert!(runs(&machines[0], "2") && runs(&machines[1], "1"));

    // An unreachable host is listed, the others still run.
    fs::write(sshd.dir.join("down-alpha"), "").unwrap();
    let out = run(&sshd, &["trigger", "--wait=120s"], true);
    assert_eq!(code(&out), 1, "{}", text(&out));
    let lines = stdout(&out);
    assert!(
        lines.lines().any(|l| l.starts_with("alpha")
            && l.contains("failed")
            && l.contains("Connection refused")),
        "{lines}"
    );
    assert!(
        lines
            .lines()
            .any(|l| l.starts_with("beta") && l.contains("success")),
        "{lines}"
    );
    assert!(runs(&machines[1], "2"));
    fs::remove_file(sshd.dir.join("down-alpha")).unwrap();

    // A failing activation: --wait says so; a plain trigger finds the host backing off;
    // --retry runs it again now and succeeds once the cause is gone.
    write_version(&sshd, "3");
    sshd.publish();
    fs::write(sshd.dir.join("fail-beta"), "").unwrap();
    let out = run(&sshd, &["trigger", "--host", "beta", "--wait=120s"], true);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(stdout(&out).contains("failure"), "{}", text(&out));
    fs::remove_file(sshd.dir.join("fail-beta")).unwrap();
    let out = run(&sshd, &["trigger", "--host", "beta", "--wait=120s"], true);
    assert_eq!(code(&out), 1, "backed off: {}", text(&out));
    assert!(runs(&machines[1], "2"));
    let out = run(
        &sshd,
        &["trigger", "--host", "beta", "--retry", "--wait=120s"],
        true,
    );
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(runs(&machines[1], "3"));
    assert!(
        fs::read_to_string(sshd.dir.join("machine-beta/trigger.log"))
            .unwrap()
            .contains("updated to version")
    );
}

#[test]
fn rollback_brings_a_host_back_to_the_earlier_system() {
    let sshd = Sshd::start(&["alpha"]);
    let machines = fleet_on_v1(&sshd);
    let m = &machines[0];
    let v1 = live(&sshd, "alpha");
    write_version(&sshd, "2");
    sshd.publish();
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    assert!(runs(m, "2"));

    let out = run(&sshd, &["rollback", "alpha", "--json"], true);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["rolled_back"][0]["to"], v1.trim());
    let now_live = live(&sshd, "alpha");
    assert_ne!(now_live, v1, "a new version, accepted by the replay rule");
    // The agent takes it and goes back to the earlier system.
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(runs(m, "1"), "{:?}", m.profile_target());
    // Held on the rollback until released (issue #24 item 3).
    assert_eq!(row(&status_json(&sshd), "alpha")["state"], "rolled-back");
    // `bento log` tells the rollback's run from the publishes' (issue #24 item 11).
    let out = run(&sshd, &["log", "alpha", "--json"], true);
    let log: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["rollback", "publish", "publish"], "{log}");
    let table = stdout(&run(&sshd, &["log", "alpha"], true));
    let first = table.lines().nth(1).unwrap();
    assert!(
        table.starts_with("ID ") && table.lines().next().unwrap().contains(" KIND "),
        "{table}"
    );
    assert!(
        first.contains(" rollback ") && first.contains(" success "),
        "{table}"
    );
    // A version that is not kept is refused, naming the host.
    let out = run(&sshd, &["rollback", "alpha", "--to", "0000dead"], true);
    assert_eq!(code(&out), 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("alpha") && err.contains("0000dead"), "{err}");
}

#[test]
fn a_held_host_is_not_published_and_selectors_must_match() {
    let sshd = Sshd::start(&["alpha", "beta"]);
    fleet_on_v1(&sshd);
    configure(
        &sshd,
        "",
        &[("beta", "hold = true\ntags = [\"lab\"]\n")],
        "",
    );
    let (alpha, beta) = (live(&sshd, "alpha"), live(&sshd, "beta"));
    write_version(&sshd, "2");

    let out = run(&sshd, &["publish"], true);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not publishing beta: hold = true"),
        "{}",
        text(&out)
    );
    assert_ne!(live(&sshd, "alpha"), alpha);
    assert_eq!(live(&sshd, "beta"), beta, "held host not published");
    // Selected explicitly, still held.
    let out = run(&sshd, &["publish", "--on", "@lab"], true);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(live(&sshd, "beta"), beta);
    let rows = status_json(&sshd);
    assert_eq!(row(&rows, "beta")["state"], "held");
    assert_eq!(row(&rows, "beta")["tags"], serde_json::json!(["lab"]));
    assert_eq!(row(&rows, "alpha")["state"], "update-pending");

    // A selector that matches nothing is an error naming it.
    for cmd in ["status", "publish", "trigger"] {
        let out = run(&sshd, &[cmd, "--on", "@nope"], true);
        assert_eq!(code(&out), 1, "{cmd}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("selector @nope matches no host"),
            "{cmd}: {}",
            text(&out)
        );
    }
    // publish --wait with no agent running gives up at its timeout, naming the host.
    let out = run(&sshd, &["publish", "--on", "alpha", "--wait=2s"], true);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("alpha") && l.contains("timed-out")),
        "{}",
        text(&out)
    );
}

/// Issue #24 item 7: the plan is printed first; a canary already drifted before the rollout
/// is judged on its run of the new version, not on that old state; a host whose trigger
/// fails (ssh's exit 255) stops the wave at once with the trigger's error; `--status` shows
/// where the rollout stands.
#[test]
fn a_rollout_judges_hosts_on_fresh_reports_and_stops_at_a_failed_trigger() {
    let sshd = Sshd::start(&["alpha", "beta"]);
    let machines = fleet_on_v1(&sshd);
    configure(
        &sshd,
        &trigger_command(&sshd),
        &[("alpha", "tags = [\"canary\"]\n")],
        "\n[rollout]\nwaves = [\"@canary\", \"100%\"]\n",
    );
    // The canary looks drifted before the rollout: its heartbeat says it runs a system it
    // did not apply (as an earlier run left it).
    let hb_path = sshd.host_dir("alpha").join("logs/heartbeat.json");
    let mut hb: serde_json::Value = serde_json::from_slice(&fs::read(&hb_path).unwrap()).unwrap();
    hb["version"] = serde_json::Value::Null;
    hb["system"] = format!("/nix/store/{}-nixos-system-alpha-handmade", "a".repeat(32)).into();
    fs::write(&hb_path, serde_json::to_vec(&hb).unwrap()).unwrap();
    assert_eq!(row(&status_json(&sshd), "alpha")["state"], "drifted");

    write_version(&sshd, "2");
    fs::write(sshd.dir.join("down-beta"), "").unwrap();
    let out = run(
        &sshd,
        &["rollout", "--trigger", "--wait-timeout", "120s"],
        true,
    );
    assert_eq!(code(&out), 1, "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    // The plan, before the first wave.
    let plan = err
        .find("plan: wave 1/2 (@canary): alpha")
        .unwrap_or_else(|| panic!("{}", text(&out)));
    assert!(
        err.contains("plan: wave 2/2 (100%): beta"),
        "{}",
        text(&out)
    );
    let started = err
        .find("note: wave 1/2")
        .unwrap_or_else(|| panic!("{}", text(&out)));
    assert!(plan < started, "{}", text(&out));
    // The canary ran version 2: its old drift did not halt wave 1.
    assert!(runs(&machines[0], "2"), "{}", text(&out));
    // Wave 2 stopped at beta's trigger, with ssh's error, not at the timeout.
    assert!(
        err.contains("halted at wave 2/2")
            && err.contains("triggering beta failed")
            && err.contains("Connection refused"),
        "{}",
        text(&out)
    );
    assert!(!err.contains("timed-out"), "{}", text(&out));
    assert!(runs(&machines[1], "1"));

    // Where it stands.
    let out = run(&sshd, &["rollout", "--status"], true);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let shown = stdout(&out);
    assert!(
        shown.contains("halted at wave 2/2: triggering beta failed")
            && shown.contains("done     wave 1/2 (@canary): alpha")
            && shown.contains("halted   wave 2/2 (100%): beta"),
        "{shown}"
    );
    let out = run(&sshd, &["rollout", "--status", "--json"], true);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["phase"], "halted");
    assert_eq!(json["wave"], 1);
    assert_eq!(json["halt"]["hosts"], serde_json::json!(["beta"]));

    // Reachable again: resume finishes it.
    fs::remove_file(sshd.dir.join("down-beta")).unwrap();
    let out = run(&sshd, &["rollout", "--resume", "--trigger"], true);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(runs(&machines[1], "2"));
    let out = run(&sshd, &["rollout", "--status"], true);
    assert!(stdout(&out).contains("done (2 waves)"), "{}", text(&out));
}
