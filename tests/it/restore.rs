//! Issue #24 item 2 and issue #23 item 2: a server that lost (or was given) serials. The
//! publisher numbers above what it can prove (its record, manifests signed with the fleet
//! key, the serial a host reports), never from a serial nothing proves, and
//! `publish --serial-floor N` is the way out the agent's refusal names.

use std::fs;
use std::process::Output;

use bento::protocol::manifest::{Digest, Manifest};

use crate::agent::{code, fleet, text, write_version, Machine, EXIT_FAILED, EXIT_UPDATED};
use crate::common::bento;
use crate::common::sshd::Sshd;
use crate::signing::{keygen, live, set_signing_key};

fn publish(sshd: &Sshd, extra: &[&str]) -> Output {
    bento()
        .args(["publish", "--no-eval", "--json", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .args(extra)
        .output()
        .unwrap()
}

/// `bento publish`, which must succeed.
fn published(sshd: &Sshd, extra: &[&str]) -> Output {
    let out = publish(sshd, extra);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn live_serial(sshd: &Sshd) -> u64 {
    let digest = live(sshd, "alpha");
    let dir = sshd.host_dir("alpha");
    Manifest::parse(&fs::read(bento::protocol::layout::manifest(&dir, &digest)).unwrap())
        .unwrap()
        .serial
}

/// What a restore from a backup without the newest versions, or a new disk, loses: every
/// manifest, `current` and the publisher's own records.
fn lose_server_state(sshd: &Sshd, heartbeat_too: bool) {
    let dir = sshd.host_dir("alpha");
    for entry in fs::read_dir(dir.join("manifests")).unwrap() {
        fs::remove_file(entry.unwrap().path()).unwrap();
    }
    fs::remove_file(dir.join("current")).unwrap();
    let _ = fs::remove_file(sshd.chroot().join(".bento/serials.log"));
    if heartbeat_too {
        fs::remove_file(dir.join("logs/heartbeat.json")).unwrap();
    }
}

#[test]
fn a_restored_server_numbers_above_what_the_host_applied() {
    let sshd = Sshd::start(&["alpha"]);
    let key = sshd.dir.join("signing/key");
    let public = keygen(&key);
    set_signing_key(&sshd, &key);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", &format!("trusted_keys = [\"{public}\"]\n"));
    for v in ["1", "2"] {
        write_version(&sshd, v);
        sshd.publish();
        let out = m.update();
        assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    }
    assert_eq!(
        m.heartbeat().serial,
        Some(2),
        "the heartbeat says what it applied"
    );

    // The manifests, `current` and the serial record are gone; the host's heartbeat is
    // what proves serial 2: the next version is 3, and the host takes it.
    lose_server_state(&sshd, false);
    write_version(&sshd, "3");
    published(&sshd, &[]);
    assert_eq!(live_serial(&sshd), 3);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));

    // Everything gone, the heartbeat too: publish starts again at 1, and the host refuses
    // it, naming the way out.
    lose_server_state(&sshd, true);
    write_version(&sshd, "4");
    published(&sshd, &[]);
    assert_eq!(live_serial(&sshd), 1);
    let out = m.update();
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let error = m.latest_report().error.unwrap();
    assert!(
        error.contains("replayed")
            && error.contains("bento publish --host <this host> --serial-floor 4"),
        "{error}"
    );
    assert!(
        m.profile_target().unwrap().contains("-alpha-3"),
        "still on 3"
    );

    // The operator's way out, before the refusing host's next heartbeat would have told
    // the publisher on its own: --serial-floor, even with the same content.
    fs::remove_file(sshd.host_dir("alpha").join("logs/heartbeat.json")).unwrap();
    let out = published(&sshd, &["--host", "alpha", "--serial-floor", "4"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["status"], "published", "{json}");
    assert_eq!(live_serial(&sshd), 4);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(m.profile_target().unwrap().contains("-alpha-4"));

    // The refusing host's heartbeat alone also repairs it: a version published at serial 1
    // again is renumbered above the 4 the host reports, same content or not.
    lose_server_state(&sshd, true);
    let out = publish(&sshd, &[]);
    assert!(out.status.success());
    assert_eq!(live_serial(&sshd), 1);
    assert_eq!(code(&m.update()), EXIT_FAILED);
    published(&sshd, &[]);
    assert_eq!(live_serial(&sshd), 5);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
}

/// Writes `current` to a copy of the live manifest with `serial`, signed (if at all) by
/// a key that is not the fleet's.
fn forge_live(sshd: &Sshd, serial: u64, other_key: Option<&std::path::Path>) -> Digest {
    let dir = sshd.host_dir("alpha");
    let v = live(sshd, "alpha");
    let mut m =
        Manifest::parse(&fs::read(bento::protocol::layout::manifest(&dir, &v)).unwrap()).unwrap();
    m.serial = serial;
    let bytes = m.to_bytes();
    let forged = Digest::of(&bytes);
    fs::write(bento::protocol::layout::manifest(&dir, &forged), &bytes).unwrap();
    if let Some(k) = other_key {
        let signer = bento::protocol::signing::Signer::load(k).unwrap();
        fs::write(
            bento::protocol::layout::signature(&dir, &forged),
            signer.sign(&bytes).unwrap(),
        )
        .unwrap();
    }
    fs::write(
        bento::protocol::layout::current(&dir),
        bento::protocol::layout::current_text(&forged),
    )
    .unwrap();
    forged
}

#[test]
fn a_saturated_serial_written_into_the_chroot_does_not_lock_hosts_out() {
    let sshd = Sshd::start(&["alpha"]);
    let key = sshd.dir.join("signing/key");
    let public = keygen(&key);
    let intruder = sshd.dir.join("signing/intruder");
    keygen(&intruder);
    set_signing_key(&sshd, &key);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", &format!("trusted_keys = [\"{public}\"]\n"));
    write_version(&sshd, "1");
    sshd.publish();
    assert_eq!(code(&m.update()), EXIT_UPDATED);

    // Someone with write access to the chroot sets the serial to the highest there is,
    // signed with another key: the host refuses it, and the publisher never numbers from it.
    let forged = forge_live(&sshd, u64::MAX, Some(&intruder));
    assert_eq!(code(&m.update()), EXIT_FAILED);
    write_version(&sshd, "2");
    let out = published(&sshd, &[]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings = json[0]["warnings"].to_string();
    assert!(
        warnings.contains("18446744073709551615") && warnings.contains("not trusted"),
        "{json}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not trusted"));
    assert_eq!(live_serial(&sshd), 2);
    assert!(
        !bento::protocol::layout::manifest(&sshd.host_dir("alpha"), &forged).exists(),
        "the forged manifest is gone, or it would stay the newest kept version"
    );
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(m.profile_target().unwrap().contains("-alpha-2"));
}

#[test]
fn an_unsigned_fleet_refuses_a_serial_jump_it_did_not_make() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    write_version(&sshd, "1");
    sshd.publish();
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    forge_live(&sshd, u64::MAX, None);
    let before = crate::common::tree_fingerprint(&sshd.host_dir("alpha"));

    write_version(&sshd, "2");
    let out = publish(&sshd, &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let error = json[0]["error"].as_str().unwrap();
    assert!(
        error.contains("18446744073709551615")
            && error.contains("did not make that jump")
            && error.contains("bento publish --host alpha --serial-floor N"),
        "{json}"
    );
    assert_eq!(
        crate::common::tree_fingerprint(&sshd.host_dir("alpha")),
        before,
        "a refused host is left as it was"
    );
    // The operator checked the chroot and vouches for a floor.
    published(&sshd, &["--serial-floor", "2"]);
    assert_eq!(live_serial(&sshd), 2);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
}

/// A publisher upgraded from a bento that kept a serial record per host
/// (`.bento/serials/<host>`): those records still count, and the next publish folds them
/// into `.bento/serials.log` and removes them.
#[test]
fn serial_records_an_earlier_bento_kept_per_host_still_count() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    write_version(&sshd, "1");
    sshd.publish();
    assert_eq!(live_serial(&sshd), 1);
    let state = sshd.chroot().join(".bento");
    fs::remove_file(state.join("serials.log")).unwrap();
    fs::create_dir(state.join("serials")).unwrap();
    fs::write(state.join("serials/alpha"), "41\n").unwrap();

    write_version(&sshd, "2");
    published(&sshd, &[]);
    assert_eq!(live_serial(&sshd), 42, "numbered above the old record");
    assert!(!state.join("serials").exists(), "folded into the log");
    let log = fs::read_to_string(state.join("serials.log")).unwrap();
    assert_eq!(log, "alpha 42\n");
}
