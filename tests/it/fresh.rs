//! Issue #27 items 4 and 6: the signed freshness window. A store frozen on an old version
//! past `[server] freshness` makes the agent change nothing, report `stale` and exit 13;
//! `bento publish --refresh` re-signs the stamps and writes no version; a tampered stamp is
//! refused. Over the real sshd and Nix, the agent's clock moved by libfaketime
//! (tests/it/skew.rs).

use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant, SystemTime};

use bento::protocol::freshness::FreshStamp;
use bento::protocol::layout::Key;
use bento::protocol::manifest::Digest;
use bento::protocol::HostName;

use crate::agent::{code, fleet, text, write_version, Machine, EXIT_UPDATED};
use crate::common::bento;
use crate::common::sshd::Sshd;
use crate::signing::{keygen, live, set_signing_key};

const EXIT_STALE: i32 = 13;
/// `bento status`: a host needs a person.
const EXIT_UNHEALTHY: i32 = 2;

/// A signing fleet with `freshness = "1h"`, published once, and a machine that trusts it.
fn fresh_fleet(sshd: &Sshd) -> String {
    let key = sshd.dir.join("signing/key");
    let public = keygen(&key);
    set_signing_key(sshd, &key);
    set_freshness(sshd, "1h");
    fleet(sshd);
    format!("trusted_keys = [\"{public}\"]\n")
}

fn set_freshness(sshd: &Sshd, window: &str) {
    let toml = sshd.fleet().join("bento.toml");
    let text = fs::read_to_string(&toml).unwrap();
    let text = text.replacen(
        "[server]\n",
        &format!("[server]\nfreshness = \"{window}\"\n"),
        1,
    );
    fs::write(toml, text).unwrap();
}

fn stamp_path(sshd: &Sshd, host: &str, version: &Digest) -> std::path::PathBuf {
    sshd.host_dir(host).join(Key::Fresh(*version).path())
}

/// The stamp of `version`, checked as the agent checks it.
fn stamp(sshd: &Sshd, version: &Digest) -> FreshStamp {
    let bytes = fs::read(stamp_path(sshd, "alpha", version)).expect("a stamp beside the version");
    FreshStamp::parse_untrusted(&bytes, &HostName::new("alpha").unwrap(), version, None).unwrap()
}

/// The agent with its clock `offset` ahead (libfaketime), as tests/it/skew.rs runs it.
fn update_at(m: &Machine<'_>, offset: &str) -> Output {
    let lib = crate::skew::libfaketime();
    m.update_with(
        &[
            ("LD_PRELOAD", lib.to_str().unwrap()),
            ("FAKETIME", offset),
            ("DONT_FAKE_MONOTONIC", "1"),
        ],
        &[],
    )
}

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

fn agent_status(m: &Machine<'_>) -> serde_json::Value {
    let out = bento()
        .args(["agent", "status", "--json", "--config"])
        .arg(m.config())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    json_of(&out)
}

fn status(sshd: &Sshd) -> Output {
    bento()
        .args(["status", "--json", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .output()
        .unwrap()
}

fn publish_refresh(sshd: &Sshd) -> Output {
    bento()
        .args(["publish", "--refresh", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .output()
        .unwrap()
}

/// Every file of a host's published tree (not `logs/`), with its bytes.
fn published_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["", "manifests", "objects"] {
        for e in fs::read_dir(dir.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                out.push((
                    format!("{sub}/{}", e.file_name().to_string_lossy()),
                    fs::read(e.path()).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// Copies a host's directory as `cp -a` does (owners, modes, links), for a frozen copy.
fn copy_tree(from: &Path, to: &Path) {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_store_frozen_past_the_window_is_stale_and_nothing_is_applied() {
    let sshd = Sshd::start(&["alpha"]);
    let trusted = fresh_fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", &trusted);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert_eq!(agent_status(&m)["freshness"], "fresh");

    // Version 2 is published; the store is copied then, and frozen on it while the
    // server goes on to version 3 (serial 3) elsewhere.
    write_version(&sshd, "2");
    sshd.publish();
    let v2 = live(&sshd, "alpha");
    let dir = sshd.host_dir("alpha");
    let frozen = sshd.dir.join("frozen-alpha");
    copy_tree(&dir, &frozen);
    write_version(&sshd, "3");
    sshd.publish();
    assert_ne!(live(&sshd, "alpha"), v2);
    fs::rename(&dir, sshd.dir.join("moved-on-alpha")).unwrap();
    fs::rename(&frozen, &dir).unwrap();
    assert_eq!(
        live(&sshd, "alpha"),
        v2,
        "the host is served the frozen copy"
    );

    // Two hours on, the 1 h stamp of version 2 ran out: stale, nothing applied.
    let out = update_at(&m, "+2h");
    assert_eq!(code(&out), EXIT_STALE, "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("stale") && said.contains("ran out at"),
        "{said}"
    );
    assert_eq!(m.activations().len(), 1, "nothing but version 1 activated");
    assert!(
        m.profile_target().unwrap().contains("-alpha-1"),
        "still on 1"
    );
    let hb = m.heartbeat();
    assert!(
        hb.stale.as_deref().is_some_and(|s| s.contains("ran out")),
        "{hb:?}"
    );
    let local = agent_status(&m);
    assert_eq!(local["freshness"], "stale", "{local}");
    assert!(
        local["stale"]["reason"]
            .as_str()
            .unwrap()
            .contains(&v2.short()),
        "{local}"
    );

    // The publisher's status reads the host's word, and alarms.
    let out = status(&sshd);
    assert_eq!(code(&out), EXIT_UNHEALTHY, "{}", text(&out));
    let rows = json_of(&out);
    assert_eq!(rows[0]["state"], "stale", "{rows}");

    // Within the window the same copy is fresh: the time decides, not the version.
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(m.profile_target().unwrap().contains("-alpha-2"));
    assert_eq!(agent_status(&m)["freshness"], "fresh");
    assert_eq!(m.heartbeat().stale, None);
}

#[test]
fn refresh_re_signs_the_stamps_and_writes_no_version() {
    let sshd = Sshd::start(&["alpha"]);
    // Without freshness there is nothing to refresh: said, and a failure.
    fleet(&sshd);
    let out = publish_refresh(&sshd);
    assert_ne!(code(&out), 0, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("freshness is not set"),
        "{}",
        text(&out)
    );

    let key = sshd.dir.join("signing/key");
    keygen(&key);
    set_signing_key(&sshd, &key);
    set_freshness(&sshd, "7d");
    sshd.publish();
    let v = live(&sshd, "alpha");
    let before = stamp(&sshd, &v);
    let dir = sshd.host_dir("alpha");
    let files = published_files(&dir);
    let journal = sshd.chroot().join(".bento/journal.jsonl");
    let journal_before = fs::read(&journal).unwrap_or_default();

    // Stamps have whole seconds: wait (bounded) for the clock to pass the publish's second.
    let published = before.not_after.system_time() - Duration::from_secs(7 * 86_400);
    let deadline = Instant::now() + Duration::from_secs(5);
    while SystemTime::now() < published + Duration::from_secs(1) {
        assert!(Instant::now() < deadline, "the clock did not move");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = publish_refresh(&sshd);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("re-signed the freshness stamps of 1 hosts"),
        "{}",
        text(&out)
    );
    let after = stamp(&sshd, &v);
    assert!(after.not_after > before.not_after, "{before:?} → {after:?}");
    assert_eq!(after.serial, before.serial);
    assert_eq!(live(&sshd, "alpha"), v, "current unchanged");
    let now_files = published_files(&dir);
    let changed: Vec<&String> = now_files
        .iter()
        .zip(&files)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| &a.0)
        .collect();
    assert_eq!(now_files.len(), files.len(), "no file added or removed");
    assert_eq!(
        changed,
        [&format!("manifests/{v}.fresh")],
        "only the stamp changed"
    );
    assert_eq!(
        fs::read(&journal).unwrap_or_default(),
        journal_before,
        "no journal entry"
    );
}

#[test]
fn a_tampered_stamp_is_refused() {
    let sshd = Sshd::start(&["alpha"]);
    let trusted = fresh_fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", &trusted);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));

    write_version(&sshd, "2");
    sshd.publish();
    let v2 = live(&sshd, "alpha");
    let path = stamp_path(&sshd, "alpha", &v2);
    let good = fs::read_to_string(&path).unwrap();
    // A stamp pushed a year on by whoever holds the store: the signature no longer fits.
    let year = &good[good.find("\"not_after\":\"").unwrap() + 13..][..4];
    let later = (year.parse::<u32>().unwrap() + 1).to_string();
    let tampered = good.replacen(
        &format!("\"not_after\":\"{year}"),
        &format!("\"not_after\":\"{later}"),
        1,
    );
    assert_ne!(tampered, good);
    fs::write(&path, &tampered).unwrap();

    let out = m.update();
    assert_eq!(code(&out), EXIT_STALE, "{}", text(&out));
    assert!(
        text(&out).contains("refused") && text(&out).contains("signature"),
        "{}",
        text(&out)
    );
    assert!(
        m.profile_target().unwrap().contains("-alpha-1"),
        "not applied"
    );

    // The stamp as the fleet key signed it: applied.
    fs::write(&path, &good).unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(m.profile_target().unwrap().contains("-alpha-2"));
}

/// Issue #27: "a mirror frozen on an old version past the window". The server is down and
/// the host's only mirror is an export nobody refreshes: within the window the host updates
/// from it; past it, the mirror's stamp has run out on every source the host reaches, so
/// it applies nothing newer from it, says `stale` and exits 13.
#[test]
fn a_mirror_frozen_past_the_window_is_stale_while_the_server_is_down() {
    let sshd = Sshd::start(&["alpha"]);
    let trusted = fresh_fleet(&sshd);
    let relay = crate::common::relay::Relay::start(sshd.port);
    let m = Machine::new(&sshd, "alpha", "").via(relay.port);
    let mirror = sshd.dir.join("mirror");
    m.write_config(&format!(
        "{trusted}mirrors = [\"file://{}\"]\n",
        mirror.join("alpha").display()
    ));
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));

    // Version 2 exported to the mirror once, then the server goes away.
    write_version(&sshd, "2");
    crate::mirrors::publish_export(&sshd, &mirror);
    relay.set_down(true);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(m.profile_target().unwrap().contains("-alpha-2"));

    // Version 3 reaches the mirror, but nobody refreshes it: two hours on, past the 1 h
    // window, the host neither applies it nor calls itself up to date.
    write_version(&sshd, "3");
    crate::mirrors::publish_export(&sshd, &mirror);
    let out = update_at(&m, "+2h");
    assert_eq!(code(&out), EXIT_STALE, "{}", text(&out));
    assert!(text(&out).contains("ran out at"), "{}", text(&out));
    assert!(
        m.profile_target().unwrap().contains("-alpha-2"),
        "nothing applied"
    );
    assert_eq!(agent_status(&m)["freshness"], "stale");
}
