//! `bento init`

use crate::common::bento;

#[test]
fn init_creates_a_fleet_that_publishes() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("fleet");
    bento().arg("init").arg(&dir).assert().success();
    assert!(dir.join("bento.toml").is_file());
    assert!(dir.join("hosts/example/configuration.nix").is_file());
    assert_eq!(
        std::fs::read_link(dir.join("hosts/example/common")).unwrap(),
        std::path::Path::new("../../common")
    );

    // A second init refuses and changes nothing.
    let before = std::fs::read(dir.join("bento.toml")).unwrap();
    let out = bento()
        .arg("init")
        .arg(&dir)
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    let err = String::from_utf8_lossy(&out);
    assert!(err.contains("already holds a fleet"), "{err}");
    assert_eq!(std::fs::read(dir.join("bento.toml")).unwrap(), before);
}

#[test]
fn commands_find_the_fleet_upwards_and_say_when_there_is_none() {
    let t = tempfile::tempdir().unwrap();
    let out = bento()
        .current_dir(t.path())
        .args(["publish", "--chroot", "/nonexistent-bento"])
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    let err = String::from_utf8_lossy(&out);
    assert!(err.contains("no bento.toml"), "{err}");
}

/// `bento init` leads somewhere: a git repository with a first commit (so the first publish
/// is not "dirty"), the whole sequence printed, `bento host add` keeping every byte of its
/// commented bento.toml, and `bento keygen -o` into the repo refused before writing.
#[test]
fn init_commits_prints_the_steps_and_host_add_keeps_every_byte() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("fleet");
    let out = bento().arg("init").arg(&dir).assert().success();
    let said = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    for step in [
        "bento keygen",
        "bento host add",
        "sync-accounts",
        "sshd_config.d/00-bento.conf",
        "bento publish",
        "bento agent-config",
    ] {
        assert!(said.contains(step), "{step}: {said}");
    }
    let status = std::process::Command::new("git")
        .arg("-C")
        .arg(&dir)
        .args(["status", "--porcelain"])
        .output()
        .unwrap();
    assert!(status.status.success());
    assert_eq!(String::from_utf8_lossy(&status.stdout), "", "a clean tree");
    let log = std::process::Command::new("git")
        .arg("-C")
        .arg(&dir)
        .args(["log", "--oneline"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&log.stdout).lines().count(), 1);

    let before = std::fs::read_to_string(dir.join("bento.toml")).unwrap();
    assert!(before.contains("# "), "a commented file");
    let key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHyvBNWS0tUTjrP3DxEx8bnhSwa7hvxOHgTSxBqYpMCy root@web";
    bento()
        .args([
            "host",
            "add",
            "web",
            "--tag",
            "eu",
            "--no-account",
            "--key",
            key,
            "--fleet",
        ])
        .arg(&dir)
        .assert()
        .success();
    let after = std::fs::read_to_string(dir.join("bento.toml")).unwrap();
    assert!(
        after.starts_with(&before),
        "every byte before the new table kept"
    );
    assert_eq!(
        &after[before.len()..],
        format!("\n[hosts.web]\nkey = \"{key}\"\ntags = [\"eu\"]\n")
    );
    let conf = std::fs::read_to_string(dir.join("hosts/web/configuration.nix")).unwrap();
    assert!(conf.contains("networking.hostName = \"web\";"), "{conf}");
    // The same host again is refused, and nothing changes.
    bento()
        .args([
            "host",
            "add",
            "web",
            "--no-account",
            "--key",
            key,
            "--fleet",
        ])
        .arg(&dir)
        .assert()
        .failure();
    assert_eq!(
        std::fs::read_to_string(dir.join("bento.toml")).unwrap(),
        after
    );

    let out = bento()
        .args(["keygen", "-o"])
        .arg(dir.join("keys/signing_key"))
        .assert()
        .failure();
    let err = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(err.contains("inside the fleet repo"), "{err}");
    assert!(!dir.join("keys").exists(), "nothing written");
}
