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
