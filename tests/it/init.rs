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
