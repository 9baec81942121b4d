//! Issue #24 item 4, end to end over the real sshd and real Nix: `bento diff` names every
//! change a new version would carry (a `files/` secret by path and hash, never its
//! contents; settings by key) besides whether the system changes, and whether publishing
//! makes a new version; `bento publish --dry-run` says the same, and neither writes: every
//! file under the chroot, its `.bento/` state included, keeps its bytes and mode. An `.age`
//! secret is named by its ciphertext's hash.

use std::fs;

use serde_json::Value;

use crate::agent::{code, fleet, text, Machine, EXIT_UPDATED};
use crate::common::sshd::Sshd;
use crate::common::{bento, tree_fingerprint};

/// `bento ARGS… --fleet F` (the fleet's bento.toml names this sshd's chroot): exit, stdout,
/// stderr.
fn run(sshd: &Sshd, args: &[&str]) -> (i32, String, String) {
    let out = bento()
        .args(args)
        .arg("--fleet")
        .arg(sshd.fleet())
        .timeout(std::time::Duration::from_secs(300))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not one JSON document ({e}): {stdout}"))
}

#[test]
fn diff_and_dry_run_name_a_secret_checks_and_interval_and_write_nothing() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));

    let (c, out, err) = run(&sshd, &["diff"]);
    assert_eq!(c, 0, "{out}{err}");
    assert!(out.contains("nothing changes"), "{out}");
    assert!(out.contains("new version: no (unchanged)"), "{out}");

    // A secret edited, checks added, the interval changed: the system stays the same.
    let secret = sshd
        .fleet()
        .join("hosts/alpha/files/alpha/etc/bento-it/secret");
    let rotated = format!("rotated secret {}\n", sshd.prefix);
    fs::write(&secret, &rotated).unwrap();
    let toml = sshd.fleet().join("bento.toml");
    let mut cfg = fs::read_to_string(&toml).unwrap();
    // `[hosts.alpha]` is the last table: what follows is its.
    assert!(cfg.rfind("[hosts.alpha]") > cfg.rfind("[server]"), "{cfg}");
    cfg.push_str("interval = \"5m\"\nchecks = [{ command = [\"true\"] }]\n");
    fs::write(&toml, cfg).unwrap();

    // Without its serial records (a state from before them), publish would write them
    // first; a dry run must not.
    fs::remove_file(sshd.chroot().join(".bento/serials.log")).unwrap();
    let before = tree_fingerprint(&sshd.chroot());
    let (c, out, err) = run(&sshd, &["diff", "--host", "alpha"]);
    assert_eq!(c, 0, "{out}{err}");
    let line = |needles: &[&str]| out.lines().any(|l| needles.iter().all(|n| l.contains(n)));
    let sha = bento::protocol::manifest::Digest::of(rotated.as_bytes()).to_hex();
    assert!(
        line(&["files: changed etc/bento-it/secret", &sha[..12]]),
        "{out}"
    );
    assert!(line(&["settings: interval_secs 900 → 300"]), "{out}");
    assert!(line(&["settings: checks", "→", "true"]), "{out}");
    assert!(out.contains("the system does not change"), "{out}");
    assert!(
        out.contains("new version: yes (files changed, settings changed)"),
        "{out}"
    );
    assert!(
        !out.contains(rotated.trim()),
        "diff printed the secret: {out}"
    );

    let (c, out, err) = run(&sshd, &["diff", "--json"]);
    assert_eq!(c, 0, "{out}{err}");
    let doc = json(&out);
    let host = &doc[0];
    assert_eq!(host["host"], "alpha", "{doc}");
    assert_eq!(host["status"], "unchanged", "the system: {doc}");
    assert_eq!(host["new_version"], true, "{doc}");
    assert_eq!(host["publish"], "new version", "{doc}");
    let file = &host["tree"]["files"][0];
    assert_eq!(file["path"], "etc/bento-it/secret", "{doc}");
    assert_eq!(file["change"], "changed", "{doc}");
    assert_eq!(file["sha256_after"], sha.as_str(), "{doc}");
    let keys: Vec<&str> = host["tree"]["settings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["checks", "interval_secs"], "{doc}");
    assert!(
        !out.contains(rotated.trim()),
        "diff printed the secret: {out}"
    );

    // publish --dry-run: the same decision, and nothing written.
    let (c, out, err) = run(&sshd, &["publish", "--dry-run"]);
    assert_eq!(c, 0, "{out}{err}");
    assert!(
        out.lines().any(|l| l.starts_with("alpha")
            && l.contains("new version (files changed, settings changed)")),
        "{out}"
    );
    assert!(err.contains("nothing was written"), "{err}");
    let (c, out, err) = run(&sshd, &["publish", "--dry-run", "--json"]);
    assert_eq!(c, 0, "{out}{err}");
    let doc = json(&out);
    assert_eq!(doc["result"], "ok", "{doc}");
    assert_eq!(doc["dry_run"], true, "{doc}");
    let host = &doc["hosts"][0];
    assert_eq!(host["result"], "new version", "{doc}");
    assert_eq!(host["reason"], "files changed, settings changed", "{doc}");
    assert_eq!(host["changes"]["files"][0]["sha256_after"], sha.as_str());
    assert_eq!(
        tree_fingerprint(&sshd.chroot()),
        before,
        "diff or publish --dry-run changed the chroot or its state"
    );

    // The real publish agrees, and after it nothing is left to publish.
    sshd.publish();
    assert_ne!(tree_fingerprint(&sshd.chroot()), before);
    let (c, out, err) = run(&sshd, &["publish", "--dry-run", "--json"]);
    assert_eq!(c, 0, "{out}{err}");
    let doc = json(&out);
    assert_eq!(doc["hosts"][0]["result"], "unchanged", "{doc}");
    assert_eq!(doc["hosts"][0]["new_version"], false, "{doc}");

    // An `.age` secret, re-encrypted with new contents: named by its ciphertext's hash,
    // marked secret, never decrypted or shown.
    let age = sshd
        .fleet()
        .join("hosts/alpha/files/alpha/etc/bento-it/api.age");
    encrypt_for(&sshd, "first api token\n", &age);
    sshd.publish();
    let token = format!("second api token {}", sshd.prefix);
    encrypt_for(&sshd, &format!("{token}\n"), &age);
    let sha = bento::protocol::manifest::Digest::of(&fs::read(&age).unwrap()).to_hex();
    let (c, out, err) = run(&sshd, &["diff"]);
    assert_eq!(c, 0, "{out}{err}");
    assert!(
        out.lines().any(
            |l| l.contains("files: changed etc/bento-it/api.age (secret, sha256")
                && l.contains(&format!("→ {}", &sha[..12]))
        ),
        "{out}"
    );
    assert!(out.contains("new version: yes (files changed)"), "{out}");
    let (c, out, err) = run(&sshd, &["diff", "--json"]);
    assert_eq!(c, 0, "{out}{err}");
    let doc = json(&out);
    let file = &doc[0]["tree"]["files"][0];
    assert_eq!(file["path"], "etc/bento-it/api.age", "{doc}");
    assert_eq!(file["secret"], true, "{doc}");
    assert_eq!(file["sha256_after"], sha.as_str(), "{doc}");
    assert!(!out.contains(&token), "{out}");
}

/// Encrypts `text` to host alpha's key with the age CLI into `to`.
fn encrypt_for(sshd: &Sshd, text: &str, to: &std::path::Path) {
    let plain = sshd.dir.join("plain");
    fs::write(&plain, text).unwrap();
    let recipients = sshd.dir.join("recipients");
    fs::write(&recipients, format!("{}\n", sshd.public_key("alpha"))).unwrap();
    let st = std::process::Command::new("/usr/bin/age")
        .args(["-a", "-R"])
        .arg(&recipients)
        .arg("-o")
        .arg(to)
        .arg(&plain)
        .status()
        .unwrap();
    assert!(st.success());
    fs::remove_file(&plain).unwrap();
}
