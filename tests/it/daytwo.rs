//! Issue #24, the agent's and the CLI's truths after day one, end to end over the real sshd
//! and real Nix: `mode = "test"` leaves the profile alone and never reboots; an agent
//! configured as another host is refused before it writes anything; a deep `state_dir`
//! still connects; every `--json` command prints one document on failure too.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::agent::{code, fleet, text, write_version, Machine, EXIT_NOOP, EXIT_UPDATED};
use crate::common::bento;
use crate::common::sshd::Sshd;

/// Points the machine's `current_system` at a link only activation moves (as
/// `/run/current-system` on NixOS), so a `test` activation is seen running without the
/// profile.
fn simulate_current_system(m: &Machine<'_>) -> PathBuf {
    let base = &m.base;
    let cfg = fs::read_to_string(m.config()).unwrap().replace(
        &format!("current_system = \"{}/no-current-system\"", base.display()),
        &format!("current_system = \"{}/current-system\"", base.display()),
    );
    assert!(cfg.contains("/current-system\""), "{cfg}");
    fs::write(m.config(), cfg).unwrap();
    let hook = base.join("hook.sh");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\ncase \"$1\" in switch|test) ln -sfn \"$2\" {b}/.cs && mv -Tf {b}/.cs {b}/current-system ;; esac\n",
            b = base.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    hook
}

/// The system profile's generations (`system-N-link`), sorted.
fn generations(m: &Machine<'_>) -> Vec<String> {
    let mut g: Vec<String> = fs::read_dir(m.base.join("profiles"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("system-") && n.ends_with("-link"))
                .collect()
        })
        .unwrap_or_default();
    g.sort();
    g
}

fn set_host_settings(sshd: &Sshd, settings: &str) {
    let toml = sshd.fleet().join("bento.toml");
    let text = fs::read_to_string(&toml).unwrap();
    // The host's own table is the last one; drop what an earlier call appended.
    let base = text.split("# settings\n").next().unwrap().to_owned();
    fs::write(&toml, format!("{base}# settings\n{settings}")).unwrap();
}

fn canonical(p: &Path) -> String {
    fs::canonicalize(p).unwrap().display().to_string()
}

#[test]
fn test_mode_activates_without_a_profile_generation_and_refuses_a_reboot_policy() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    let hook = simulate_current_system(&m);
    let env = [("BENTO_TEST_HOOK", hook.to_str().unwrap())];
    let out = m.update_with(&env, &[]);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let switched = m.profile_target().unwrap();
    assert_eq!(generations(&m), ["system-1-link"]);

    // `test` with a reboot policy is refused when bento.toml is read, naming the host and
    // both keys; nothing is published.
    let live = fs::read(sshd.host_dir("alpha").join("current")).unwrap();
    write_version(&sshd, "2");
    set_host_settings(&sshd, "mode = \"test\"\nreboot = \"when-needed-now\"\n");
    let out = bento()
        .args(["publish", "--no-eval", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for needle in [
        "bento.toml",
        "[hosts.alpha]",
        "mode = \"test\"",
        "reboot = \"when-needed-now\"",
    ] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    assert_eq!(
        fs::read(sshd.host_dir("alpha").join("current")).unwrap(),
        live
    );

    // `test` with `never`: the new system runs, the profile and its generations stay.
    set_host_settings(&sshd, "mode = \"test\"\n");
    sshd.publish();
    let out = m.update_with(&env, &[]);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let running = canonical(&m.base.join("current-system"));
    assert!(running.contains("nixos-system-alpha-2"), "{running}");
    assert_eq!(m.activations().last(), Some(&format!("test {running}")));
    assert_eq!(m.profile_target().unwrap(), switched, "the profile moved");
    assert_eq!(generations(&m), ["system-1-link"], "a generation was added");
    let report = m.latest_report();
    assert_eq!(report.system_after.as_deref(), Some(running.as_str()));
    assert!(!report.reboot_required);

    // The next timer run: up to date, nothing activated again.
    let before = m.activations().len();
    let out = m.update_with(&env, &[]);
    assert_eq!(code(&out), EXIT_NOOP, "{}", text(&out));
    assert_eq!(m.activations().len(), before);
    assert_eq!(generations(&m), ["system-1-link"]);
}

/// Every `bento …` command path that takes `--json`, read from the real definitions.
fn json_commands() -> Vec<String> {
    use clap::CommandFactory as _;
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        if cmd.get_arguments().any(|a| a.get_id() == "json") {
            out.push(path.to_owned());
        }
        for sub in cmd.get_subcommands() {
            let p = if path.is_empty() {
                sub.get_name().to_owned()
            } else {
                format!("{path} {}", sub.get_name())
            };
            walk(sub, &p, out);
        }
    }
    let mut out = Vec::new();
    walk(&bento::cli::Cli::command(), "", &mut out);
    out.sort();
    out
}

/// Issue #24 item 9: a script that asks for `--json` gets exactly one JSON document on
/// stdout on every outcome; here, each such command failing (no fleet, no agent config, the
/// server unreachable) prints `{"result": "error", "error": …}` and exits 1.
#[test]
fn every_json_command_prints_one_json_document_when_it_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let nowhere = tmp.path().join("no-fleet");
    fs::create_dir_all(&nowhere).unwrap();
    let nowhere = nowhere.to_str().unwrap();
    // An agent whose server refuses connections (port 1 on loopback).
    let agent_toml = tmp.path().join("agent.toml");
    fs::write(
        &agent_toml,
        format!(
            "host = \"alpha\"\nserver = \"sftp://bento-alpha@127.0.0.1:1\"\nidentity_file = \"{d}/key\"\nknown_hosts = \"{d}/known_hosts\"\nstate_dir = \"{d}/state\"\nprofile = \"{d}/profiles/system\"\ncurrent_system = \"{d}/no-current-system\"\nconnect_timeout = \"2s\"\n",
            d = tmp.path().display()
        ),
    )
    .unwrap();
    // A key it can read, so the run gets as far as the connection.
    fs::write(
        tmp.path().join("key"),
        "not used: the connection is refused first\n",
    )
    .unwrap();
    let agent_toml = agent_toml.to_str().unwrap();
    let missing_toml = tmp.path().join("missing.toml");
    let missing_toml = missing_toml.to_str().unwrap();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "agent status",
            vec!["agent", "status", "--config", missing_toml],
        ),
        (
            "agent update",
            vec!["agent", "update", "--config", agent_toml],
        ),
        (
            "agent check",
            vec!["agent", "check", "--config", missing_toml],
        ),
        (
            "agent-config",
            vec!["agent-config", "alpha", "--fleet", nowhere],
        ),
        ("build", vec!["build", "--fleet", nowhere]),
        ("diff", vec!["diff", "--fleet", nowhere]),
        ("flake-update", vec!["flake-update", "--fleet", nowhere]),
        ("journal", vec!["journal", "--fleet", nowhere]),
        ("log", vec!["log", "alpha", "--fleet", nowhere]),
        ("publish", vec!["publish", "--fleet", nowhere]),
        // publish --dry-run has its own path through the CLI.
        ("publish", vec!["publish", "--dry-run", "--fleet", nowhere]),
        ("rollback", vec!["rollback", "alpha", "--fleet", nowhere]),
        ("rollout", vec!["rollout", "--fleet", nowhere]),
        ("server check", vec!["server", "--fleet", nowhere, "check"]),
        (
            "server sync-accounts",
            vec!["server", "--fleet", nowhere, "sync-accounts"],
        ),
        ("status", vec!["status", "--fleet", nowhere]),
        ("trigger", vec!["trigger", "--fleet", nowhere]),
        ("versions", vec!["versions", "alpha", "--fleet", nowhere]),
    ];
    let mut covered: Vec<String> = cases.iter().map(|(n, _)| (*n).to_owned()).collect();
    covered.sort();
    covered.dedup();
    assert_eq!(
        covered,
        json_commands(),
        "a command takes --json but has no failure case here"
    );
    for (name, args) in &cases {
        let out = bento()
            .args(args)
            .arg("--json")
            .current_dir(tmp.path())
            .timeout(std::time::Duration::from_secs(60))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        let docs: Vec<serde_json::Value> = serde_json::Deserializer::from_slice(&out.stdout)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| {
                panic!(
                    "{name}: stdout is not JSON ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            });
        assert_eq!(docs.len(), 1, "{name}: {docs:?}");
        if *name == "agent check" {
            // Its document is the list of checks; a failed one is its outcome, not an error
            // of the command (docs/reference.md).
            let checks = docs[0].as_array().expect("agent check prints an array");
            assert!(
                checks.iter().any(|c| c["level"] == "fail"
                    && c["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains(missing_toml)),
                "{name}: {}",
                docs[0]
            );
            continue;
        }
        assert_eq!(docs[0]["result"], "error", "{name}: {}", docs[0]);
        let error = docs[0]["error"].as_str().unwrap_or_default();
        assert!(
            !error.is_empty() && stderr.contains(&format!("error: {error}")),
            "{name}: the document's error is not the one on stderr: {error:?} / {stderr}"
        );
    }
}

/// Every file under `dir` with its bytes, sorted (what a refused run must leave alone).
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = fs::read(&p).unwrap();
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

/// Issue #24 item 10: agent.toml naming another host than the account's live manifest is
/// refused, even when the run would be a no-op, and nothing lands in the account's logs/.
#[test]
fn an_agent_configured_as_another_host_is_refused_and_writes_nothing() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let cfg = fs::read_to_string(m.config()).unwrap();
    fs::write(
        m.config(),
        cfg.replace("host = \"alpha\"", "host = \"kiosk2\""),
    )
    .unwrap();
    let before = tree(&m.logs());
    let out = m.update_with(&[], &["--json"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("host = \"kiosk2\"") && stderr.contains("host alpha's"),
        "{}",
        text(&out)
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    assert_eq!(doc["result"], "error");
    assert!(doc["error"].as_str().unwrap().contains("kiosk2"), "{doc}");
    assert_eq!(tree(&m.logs()), before, "the refused run wrote into logs/");
    assert_eq!(m.activations().len(), 1);
}

/// Issue #24 item 11: a `state_dir` of about 100 characters still connects (the ssh control
/// socket under it would pass the Unix socket path limit).
#[test]
fn a_deep_state_dir_still_connects() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    let mut deep = m.base.join("state");
    while deep.as_os_str().len() < 100 {
        deep = deep.join("deeper");
    }
    let cfg = fs::read_to_string(m.config()).unwrap().replace(
        &format!("state_dir = \"{}/state\"", m.base.display()),
        &format!("state_dir = \"{}\"", deep.display()),
    );
    assert!(cfg.contains("deeper"), "{cfg}");
    fs::write(m.config(), cfg).unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(deep.join("state.json").is_file());
    // And the no-op run after it (the confirmation connected a second time already).
    let out = m.update();
    assert_eq!(code(&out), EXIT_NOOP, "{}", text(&out));
}

/// Issue #24 item 5, the agent's side: a version that changes only a file activates the
/// system the machine already runs; the agent says `unchanged (same system)`, not
/// `updated`, `bento log` says so, and `bento publish --wait` counts the host confirmed.
#[test]
fn an_agent_that_activates_the_system_it_runs_says_unchanged_same_system() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("updated to version"),
        "{}",
        text(&out)
    );
    let running = m.profile_target().unwrap();
    let secret = sshd
        .fleet()
        .join("hosts/alpha/files/alpha/etc/bento-it/secret");
    fs::write(&secret, "only a file changes\n").unwrap();
    sshd.publish();
    let out = m.update_with(&[], &["--json"]);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    assert_eq!(doc["result"], "unchanged", "{doc}");
    assert_eq!(doc["reason"], "same system", "{doc}");
    assert_eq!(doc["report"]["outcome"], "success", "{doc}");
    let report = m.latest_report();
    assert!(report.same_system(), "{report:?}");
    assert_eq!(report.built_system.as_deref(), Some(running.as_str()));
    assert_eq!(
        fs::read_to_string(m.base.join("root/etc/bento-it/secret")).unwrap(),
        "only a file changes\n",
        "the file of the new version is installed"
    );
    let log = bento()
        .args(["log", "alpha", "--fleet"])
        .arg(sshd.fleet())
        .output()
        .unwrap();
    let log_text = String::from_utf8_lossy(&log.stdout);
    assert!(log_text.contains("success (same system)"), "{log_text}");

    // `publish --wait` follows the host to this kind of success.
    fs::write(&secret, "another file change\n").unwrap();
    let mut wait = crate::common::bento_std();
    wait.args(["publish", "--no-eval", "--wait=120s", "--fleet"])
        .arg(sshd.fleet())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = wait.spawn().unwrap();
    let live = fs::read(sshd.host_dir("alpha").join("current")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while fs::read(sshd.host_dir("alpha").join("current")).unwrap() == live {
        assert!(
            std::time::Instant::now() < deadline,
            "publish did not go live"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("unchanged (same system)"),
        "{}",
        text(&out)
    );
    let waited =
        crate::common::sshd::wait_with_deadline(child, std::time::Duration::from_secs(150))
            .expect("publish --wait ended");
    assert_eq!(
        waited.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&waited.stdout),
        String::from_utf8_lossy(&waited.stderr)
    );
}
