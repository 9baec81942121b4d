//! `bento server …` against a real OpenSSH sshd (common/sshd.rs): what a host can and cannot
//! do in its chroot, key removal, links in `logs/`, `check`, rendering, and login storms
//! with the settings the generated config recommends.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bento::server::logs::{self, LogsError, Refusal};

use crate::common::sshd::{run_with_input, wait_with_deadline, Sshd};
use crate::common::{bento, ScratchDir};

fn text(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The live manifest digest of a host, as publish wrote it.
fn current(s: &Sshd, host: &str) -> String {
    fs::read_to_string(s.host_dir(host).join("current"))
        .unwrap()
        .trim()
        .to_owned()
}

fn first_object(s: &Sshd, host: &str) -> String {
    let mut names: Vec<String> = fs::read_dir(s.host_dir(host).join("objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().next().expect("published objects")
}

/// Runs one sftp batch expected to fail (each forbidden operation gets its own session,
/// because `sftp -b` stops at the first failing command).
fn assert_sftp_fails(s: &Sshd, host: &str, batch: &str) {
    let out = s.sftp(host, batch);
    assert!(
        !out.status.success(),
        "as {host}, `{}` should have failed:\n{}",
        batch.trim(),
        text(&out)
    );
}

/// `ssh` as `a` with `args`, stdin at end of file; fails the test if it runs past 30 s.
fn ssh_a(s: &Sshd, args: &[&str]) -> Output {
    let mut cmd = s.ssh("a");
    cmd.args(args);
    run_with_input(cmd, "", Duration::from_secs(30))
}

#[test]
fn host_reads_its_own_snapshot_and_nothing_else() {
    let s = Sshd::start(&["a", "b"]);
    s.publish();
    let local = ScratchDir::new();
    let digest = current(&s, "a");
    let object = first_object(&s, "a");

    // Reads its current, manifest and objects; byte for byte what publish wrote.
    let out = s.sftp(
        "a",
        &format!(
            "get /current {l}/current\nget /manifests/{digest}.json {l}/manifest\nget /objects/{object} {l}/object\nls -1 /\n",
            l = local.path.display()
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    let a = s.host_dir("a");
    assert_eq!(
        fs::read(local.join("current")).unwrap(),
        fs::read(a.join("current")).unwrap()
    );
    assert_eq!(
        fs::read(local.join("manifest")).unwrap(),
        fs::read(a.join(format!("manifests/{digest}.json"))).unwrap()
    );
    assert_eq!(
        fs::read(local.join("object")).unwrap(),
        fs::read(a.join("objects").join(&object)).unwrap()
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    for name in ["current", "manifests", "objects", "logs"] {
        assert!(listing.contains(name), "{listing}");
    }

    // Host B's directory and the server's files do not exist from inside A's jail.
    let b_digest = current(&s, "b");
    let b_abs = s.host_dir("b");
    for path in [
        "/b/current".to_owned(),
        "/../b/current".to_owned(),
        "../../b/current".to_owned(),
        format!("{}/current", b_abs.display()),
        format!("/../b/manifests/{b_digest}.json"),
        "/etc/passwd".to_owned(),
        "/../../../etc/passwd".to_owned(),
        format!("{}/.bento/publish.lock", s.chroot().display()),
    ] {
        assert_sftp_fails(&s, "a", &format!("get {path} /dev/null\n"));
    }
    // `ls` failures do not fail `sftp -b`: judge by the output.
    let out = s.sftp("a", &format!("-ls -1 /b\n-ls -1 {}\n", b_abs.display()));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        !listing.contains(&b_digest) && !listing.contains("secret"),
        "{}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not found") || err.contains("No such file"),
        "{}",
        text(&out)
    );

    // No shell, no command: ForceCommand runs internal-sftp whatever the client asks.
    let out = ssh_a(&s, &["127.0.0.1", "echo", "pwned-by-a"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("pwned-by-a"),
        "{}",
        text(&out)
    );
    let out = ssh_a(&s, &["-tt", "127.0.0.1"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PTY allocation request failed"),
        "{}",
        text(&out)
    );

    // No port forwarding: neither a direct (-W, like -L) nor a remote (-R) one.
    let out = ssh_a(&s, &["-W", &format!("127.0.0.1:{}", s.port), "127.0.0.1"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stdio forwarding failed"),
        "{}",
        text(&out)
    );
    let out = ssh_a(
        &s,
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            "0:127.0.0.1:9",
            "127.0.0.1",
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forwarding failed"),
        "{}",
        text(&out)
    );

    // Writes only under logs/, and what it writes is not readable by others.
    let upload = local.join("report.json");
    fs::write(&upload, "{}\n").unwrap();
    fs::set_permissions(&upload, fs::Permissions::from_mode(0o777)).unwrap();
    let out = s.sftp(
        "a",
        &format!("put {} /logs/report.json\n", upload.display()),
    );
    assert!(out.status.success(), "{}", text(&out));
    let meta = fs::metadata(a.join("logs/report.json")).unwrap();
    assert_eq!(meta.mode() & 0o007, 0, "umask 0027 applies to uploads");
    let up = upload.display();
    for batch in [
        format!("put {up} /report.json\n"),
        format!("put {up} /manifests/x.json\n"),
        format!("put {up} /objects/x\n"),
        format!("put {up} /current\n"),
        "mkdir /newdir\n".to_owned(),
        "rm /current\n".to_owned(),
        "rename /current /logs/stolen\n".to_owned(),
        format!("rm /manifests/{digest}.json\n"),
        "chmod 777 /\n".to_owned(),
    ] {
        assert_sftp_fails(&s, "a", &batch);
    }
    assert_eq!(current(&s, "a"), digest);
    assert!(!a.join("report.json").exists() && !a.join("newdir").exists());
}

#[test]
fn a_host_whose_key_is_removed_can_no_longer_log_in() {
    let s = Sshd::start(&["a", "b"]);
    let ok = |host: &str| s.sftp(host, "ls /\n").status.success();
    assert!(ok("a") && ok("b"), "{}", s.log());
    let key_b = s.keys_dir().join(s.account("b"));
    assert_eq!(
        fs::read_to_string(&key_b).unwrap(),
        format!("restrict {}\n", s.public_key("b"))
    );
    let meta = fs::metadata(&key_b).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o644));

    // Key removed from bento.toml and synced away: b is refused, a is untouched.
    s.write_toml(&[
        ("a".to_owned(), Some(s.public_key("a"))),
        ("b".to_owned(), None),
    ]);
    let report = s.sync_accounts(false);
    assert!(report.contains("no key in bento.toml"), "{report}");
    assert!(!key_b.exists());
    let out = s.sftp("b", "ls /\n");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out)
    );
    assert!(ok("a"));

    // Idempotent: a second sync changes nothing.
    let again = s.sync_accounts(false);
    assert!(again.lines().all(|l| l.contains("unchanged")), "{again}");

    // Host removed from bento.toml and pruned: the account is gone, its data root-only.
    s.write_toml(&[("a".to_owned(), Some(s.public_key("a")))]);
    let report = s.sync_accounts(true);
    assert!(report.contains("removed"), "{report}");
    let status = Command::new("id")
        .arg(s.account("b"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "account {} still exists", s.account("b"));
    let meta = fs::metadata(s.host_dir("b")).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (0, 0, 0o700));
    assert!(!s.sftp("b", "ls /\n").status.success());
    assert!(ok("a"));
}

#[test]
fn links_cannot_be_created_and_planted_links_are_not_followed() {
    let s = Sshd::start(&["a", "b"]);
    s.publish();
    let a = s.host_dir("a");
    let b = s.host_dir("b");
    let b_manifest = format!("manifests/{}.json", current(&s, "b"));

    // Through SFTP: symlink and hard link creation are denied (-P symlink,hardlink).
    assert_sftp_fails(&s, "a", "symlink /current /logs/sym\n");
    assert_sftp_fails(&s, "a", "ln /current /logs/hard\n");
    assert_sftp_fails(&s, "a", "ln -s /current /logs/sym2\n");
    assert_eq!(fs::read_dir(a.join("logs")).unwrap().count(), 0);

    // Planted by other means (as if sftp allowed it): the server-side reader refuses them.
    let logs_dir = a.join("logs");
    fs::write(logs_dir.join("report.json"), "{\"ok\":true}\n").unwrap();
    symlink(format!("../../b/{b_manifest}"), logs_dir.join("sym")).unwrap();
    symlink(b.join("current"), logs_dir.join("abs-sym")).unwrap();
    fs::hard_link(b.join(&b_manifest), logs_dir.join("hard")).unwrap();
    // The planted symlink does point at B's manifest: following it would leak it.
    assert!(fs::read(logs_dir.join("sym")).is_ok());

    assert_eq!(logs::read(&a, "report.json").unwrap(), b"{\"ok\":true}\n");
    for (name, kind) in [
        ("sym", Refusal::Symlink),
        ("abs-sym", Refusal::Symlink),
        ("hard", Refusal::HardLink),
    ] {
        match logs::read(&a, name) {
            Err(LogsError::Refused { kind: k, path }) => {
                assert_eq!(k, kind, "{name}");
                assert!(path.ends_with(name));
            }
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
    }
    let listed: Vec<(String, Option<Refusal>)> = logs::list(&a)
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.refused))
        .collect();
    assert_eq!(
        listed,
        [
            ("abs-sym".to_owned(), Some(Refusal::Symlink)),
            ("hard".to_owned(), Some(Refusal::HardLink)),
            ("report.json".to_owned(), None),
            ("sym".to_owned(), Some(Refusal::Symlink)),
        ]
    );
}

fn check(s: &Sshd, config: &Path) -> Output {
    bento()
        .args(["server", "check", "--fleet"])
        .arg(s.fleet())
        .arg("--sshd-config")
        .arg(config)
        .arg("--sshd")
        .arg(crate::common::sshd::SSHD)
        .output()
        .unwrap()
}

#[test]
fn check_reports_a_broken_chroot_and_passes_on_a_good_one() {
    let s = Sshd::start(&["a", "b"]);
    s.publish();
    let good = check(&s, &s.config());
    assert!(good.status.success(), "{}", text(&good));
    let out = String::from_utf8_lossy(&good.stdout).into_owned();
    for line in ["server  ok", "a       ok", "b       ok"] {
        assert!(out.contains(line), "{out}");
    }

    // Group-writable chroot: reported for a, and sshd really refuses it.
    let a = s.host_dir("a");
    fs::set_permissions(&a, fs::Permissions::from_mode(0o770)).unwrap();
    let bad = check(&s, &s.config());
    assert!(!bad.status.success(), "{}", text(&bad));
    let out = String::from_utf8_lossy(&bad.stdout).into_owned();
    assert!(out.contains("a       1 problem"), "{out}");
    assert!(out.contains("group-writable (mode 0770)"), "{out}");
    assert!(out.contains("b       ok"), "{out}");
    assert!(!s.sftp("a", "ls /\n").status.success());
    fs::set_permissions(&a, fs::Permissions::from_mode(0o750)).unwrap();

    // Wrong owners: the chroot owned by the account, logs/ taken from it.
    let uid_a = fs::metadata(a.join("logs")).unwrap().uid();
    std::os::unix::fs::chown(&a, Some(uid_a), None).unwrap();
    std::os::unix::fs::chown(s.host_dir("b").join("logs"), Some(0), None).unwrap();
    let bad = check(&s, &s.config());
    assert!(!bad.status.success());
    let out = String::from_utf8_lossy(&bad.stdout).into_owned();
    assert!(
        out.contains(&format!("owned by uid {uid_a}, not root")),
        "{out}"
    );
    assert!(out.contains("logs is not writable by the account"), "{out}");

    // sync-accounts repairs both; the check passes again.
    s.sync_accounts(false);
    assert!(check(&s, &s.config()).status.success());

    // A key that differs from bento.toml, a missing account, a host without a key.
    let key_file = s.keys_dir().join(s.account("a"));
    fs::write(&key_file, format!("restrict {}\n", s.public_key("b"))).unwrap();
    s.write_toml(&[
        ("a".to_owned(), Some(s.public_key("a"))),
        ("b".to_owned(), Some(s.public_key("b"))),
        ("c".to_owned(), None),
    ]);
    let bad = check(&s, &s.config());
    assert!(!bad.status.success());
    let out = String::from_utf8_lossy(&bad.stdout).into_owned();
    assert!(out.contains("differs from bento.toml"), "{out}");
    assert!(
        out.contains(&format!("account {} is missing", s.account("c"))),
        "{out}"
    );
    assert!(out.contains("no key in bento.toml"), "{out}");
    s.write_toml(&[
        ("a".to_owned(), Some(s.public_key("a"))),
        ("b".to_owned(), Some(s.public_key("b"))),
    ]);
    s.sync_accounts(false);

    // An sshd config without the Match block.
    let bare = s.dir.join("sshd/bare_config");
    let config = fs::read_to_string(s.config()).unwrap();
    let cut = config
        .find("# bento: SFTP chroots")
        .expect("generated block");
    fs::write(&bare, &config[..cut]).unwrap();
    let bad = check(&s, &bare);
    assert!(!bad.status.success());
    let out = String::from_utf8_lossy(&bad.stdout).into_owned();
    assert!(out.contains("lacks the bento Match block"), "{out}");

    // And the JSON report says the same thing.
    let json = bento()
        .args(["server", "check", "--json", "--fleet"])
        .arg(s.fleet())
        .arg("--sshd-config")
        .arg(&bare)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["hosts"][0]["host"], "a");
    assert!(v["hosts"][0]["problems"][0]
        .as_str()
        .unwrap()
        .contains("Match block"));
}

#[test]
fn nixos_module_is_deterministic_and_parses() {
    let dir = ScratchDir::new();
    let fleet = dir.join("fleet");
    fs::create_dir_all(&fleet).unwrap();
    let key = |n: u8| {
        let path = dir.join(format!("k{n}"));
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
        fs::read_to_string(path.with_extension("pub"))
            .unwrap()
            .trim()
            .to_owned()
    };
    let (k1, k2) = (key(1), key(2));
    fs::write(
        fleet.join("bento.toml"),
        format!("[hosts.web]\nkey = \"{k1}\"\n[hosts.db]\nkey = \"{k2}\"\n[hosts.spare]\n"),
    )
    .unwrap();
    let module = |name: &str| {
        let out = bento()
            .args(["server", "nixos-module", "--fleet"])
            .arg(&fleet)
            .arg("--output")
            .arg(dir.join(name))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        fs::read(dir.join(name)).unwrap()
    };
    let first = module("one.nix");
    assert_eq!(first, module("two.nix"), "same toml, same bytes");
    let parsed = Command::new("nix-instantiate")
        .arg("--parse")
        .arg(dir.join("one.nix"))
        .output()
        .expect("nix-instantiate (Debian package nix-bin)");
    assert!(parsed.status.success(), "{}", text(&parsed));

    // The Match block in the module is the one sshd-config prints.
    let printed = bento()
        .args(["server", "sshd-config", "--fleet"])
        .arg(&fleet)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout).into_owned();
    let block = &printed[printed.find("Match Group bento").unwrap()..];
    let module_text = String::from_utf8(first).unwrap();
    for line in block.lines() {
        assert!(
            module_text.contains(line),
            "{line:?} missing from the module"
        );
    }

    // Bad keys are refused with the host's name; a shared key names both hosts.
    let refused = |toml: String, expect: &[&str]| {
        fs::write(fleet.join("bento.toml"), toml).unwrap();
        for args in [
            &["server", "nixos-module", "--output", "-"][..],
            &["server", "sync-accounts"][..],
        ] {
            let out = bento()
                .args(args)
                .arg("--fleet")
                .arg(&fleet)
                .output()
                .unwrap();
            assert!(!out.status.success(), "{args:?}: {}", text(&out));
            let err = String::from_utf8_lossy(&out.stderr);
            for e in expect {
                assert!(err.contains(e), "{args:?}: {err}");
            }
        }
    };
    refused(
        format!("[hosts.web]\nkey = \"{k1}\"\n[hosts.db]\nkey = \"{k1}\"\n"),
        &["hosts db and web have the same key"],
    );
    refused(
        "[hosts.web]\nkey = \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==\"\n".to_owned(),
        &["host web:", "malformed"],
    );
    let blob = k1.split_whitespace().nth(1).unwrap();
    refused(
        format!("[hosts.web]\nkey = \"ssh-rsa {blob}\"\n"),
        &["host web:", "\"ssh-ed25519\" key"],
    );
    refused(
        "[hosts.web]\nkey = \"\"\"\nssh-ed25519 AAAA\nssh-ed25519 AAAA\"\"\"\n".to_owned(),
        &["host web:", "single line"],
    );
    refused(
        "[hosts.web]\nkey = \"ssh-dss AAAAB3NzaC1kc3MAAACBAP\"\n".to_owned(),
        &["host web:", "\"ssh-dss\" is not accepted"],
    );
}

/// 200 sequential and 50 concurrent fresh logins (no multiplexing), each a real SFTP poll
/// of `current`, all succeed with the generated MaxStartups. About 30 s here.
#[test]
fn two_hundred_sequential_and_fifty_concurrent_logins() {
    let s = Sshd::start(&["a"]);
    s.publish();
    let poll = "get /current /dev/null\n";
    let started = Instant::now();
    for i in 0..200 {
        let out = s.sftp("a", poll);
        assert!(out.status.success(), "login {i}: {}", text(&out));
    }
    let sequential = started.elapsed();

    let started = Instant::now();
    let children: Vec<_> = (0..50)
        .map(|_| {
            let mut cmd = Command::new("sftp");
            cmd.args(["-b", "-"])
                .args(s.client_opts("a"))
                .arg("127.0.0.1")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().unwrap();
            use std::io::Write as _;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(poll.as_bytes())
                .unwrap();
            child
        })
        .collect();
    let failed: Vec<String> = children
        .into_iter()
        .filter_map(|c| {
            let out = wait_with_deadline(c, Duration::from_secs(60)).expect("sftp finishes");
            (!out.status.success()).then(|| text(&out))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 50 concurrent logins failed:\n{}\nsshd log:\n{}",
        failed.len(),
        failed.join("\n"),
        s.log()
    );
    eprintln!(
        "200 sequential logins: {sequential:?}; 50 concurrent: {:?}",
        started.elapsed()
    );
}

#[test]
fn backups_area_is_private_and_writable_by_its_host_only() {
    let s = Sshd::start(&["a", "b"]);
    let toml = s.fleet().join("bento.toml");
    let settings = fs::read_to_string(&toml).unwrap();
    fs::write(
        &toml,
        settings.replacen("[server]\n", "[server]\nbackups = true\n", 1),
    )
    .unwrap();
    s.sync_accounts(false);
    let dir = s.host_dir("a").join("backups");
    let meta = fs::metadata(&dir).unwrap();
    let account = bento::sys::accounts::user(&s.account("a"))
        .unwrap()
        .unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (account.uid, 0o700));

    let local = s.dir.join("snapshot.tar");
    fs::write(&local, b"restic would put a pack here").unwrap();
    let out = s.sftp("a", &format!("put {} backups/pack\n", local.display()));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        fs::read(dir.join("pack")).unwrap(),
        b"restic would put a pack here"
    );
    // b sees neither a's backups nor a place to write outside its own.
    assert_sftp_fails(&s, "b", "get /../a/backups/pack\n");
    assert_sftp_fails(&s, "b", &format!("put {} /pack\n", local.display()));
}

/// What `getent` and `id` say about an account: passwd and shadow lines, groups.
fn account_state(name: &str) -> String {
    let run = |program: &str, args: &[&str]| {
        let out = Command::new(program).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    format!(
        "{}{}{}",
        run("getent", &["passwd", name]),
        run("getent", &["shadow", name]),
        run("id", &["-nG", name])
    )
}

/// A fresh ed25519 public key line made in `dir`.
fn new_key(dir: &ScratchDir, name: &str) -> String {
    let path = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    fs::read_to_string(path.with_extension("pub"))
        .unwrap()
        .trim()
        .to_owned()
}

/// An account that already exists and was not made by bento (here an operator's, with a
/// shell, a password and its own home) is never taken over: sync-accounts refuses, naming
/// it, and changes nothing, neither the account nor anything else of the run.
#[test]
fn sync_accounts_refuses_to_take_over_an_account_it_did_not_make() {
    let s = Sshd::start(&["a"]);
    let keys = ScratchDir::new();
    let foreign = s.account("ops");
    let st = Command::new("useradd")
        .args(["--home-dir", "/var/empty-ops", "--shell", "/bin/sh"])
        .args(["--user-group", "--password", "$6$salt$hash", &foreign])
        .status()
        .unwrap();
    assert!(st.success());
    let _cleanup = crate::common::Accounts {
        names: vec![foreign.clone()],
    };
    let before = account_state(&foreign);
    let key_a = s.keys_dir().join(s.account("a"));
    let key_a_before = fs::read(&key_a).unwrap();

    // A new host b (its account would be created) and the host whose name spells the
    // operator's account: nothing at all may happen.
    s.write_toml(&[
        ("a".to_owned(), None),
        ("b".to_owned(), Some(new_key(&keys, "b"))),
        ("ops".to_owned(), Some(new_key(&keys, "ops"))),
    ]);
    let out = bento()
        .args(["server", "sync-accounts", "--fleet"])
        .arg(s.fleet())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "account {foreign} already exists and is not a bento host account"
        )),
        "{}",
        text(&out)
    );
    assert_eq!(account_state(&foreign), before, "the account was changed");
    assert!(
        !s.keys_dir().join(&foreign).exists(),
        "a key file was written"
    );
    assert!(!s.host_dir("ops").exists() && !s.host_dir("b").exists());
    assert!(
        bento::sys::accounts::user(&s.account("b"))
            .unwrap()
            .is_none(),
        "b's account was created before the refusal"
    );
    assert_eq!(
        fs::read(&key_a).unwrap(),
        key_a_before,
        "a's key was removed"
    );
}

/// A second fleet on the same server whose prefix overlaps the first's (`btxyz` against
/// `btxyzw-`, so `btxyzw-a` reads as its host `w-a`): in the first fleet's group its sync is
/// refused outright, naming the first fleet's account (one `Match Group` block jails one
/// fleet); with a group of its own it prunes only its own accounts. Either way the first
/// fleet's hosts keep their accounts, keys and jails, and still log in.
#[test]
fn prune_never_reaches_another_fleets_accounts() {
    let s = Sshd::start(&["a"]);
    s.publish();
    let jail = fs::metadata(s.host_dir("a")).unwrap();
    let other = ScratchDir::new();
    fs::create_dir_all(other.join("fleet")).unwrap();
    let overlapping = &s.prefix[..s.prefix.len() - 2];
    // A group of its own: the prefix's last letter replaced (the test's group is the prefix
    // without its `-`, so appending a fixed letter was the same group one run in 26).
    let last = if s.group.ends_with('o') { 'p' } else { 'o' };
    let other_group = format!("{overlapping}{last}");
    assert_ne!(other_group, s.group);
    let prune = |group: &str| {
        fs::write(
            other.join("fleet/bento.toml"),
            format!(
                "[server]\nchroot = \"{}\"\nauthorized_keys_dir = \"{}\"\naccount_prefix = \"{overlapping}\"\ngroup = \"{group}\"\n",
                other.join("chroot").display(),
                other.join("keys").display()
            ),
        )
        .unwrap();
        bento()
            .args(["server", "sync-accounts", "--prune", "--fleet"])
            .arg(other.join("fleet"))
            .output()
            .unwrap()
    };
    let untouched = |why: &str| {
        assert!(
            bento::sys::accounts::user(&s.account("a"))
                .unwrap()
                .is_some(),
            "{why}"
        );
        assert!(s.keys_dir().join(s.account("a")).exists(), "{why}");
        let after = fs::metadata(s.host_dir("a")).unwrap();
        assert_eq!(
            (after.uid(), after.gid(), after.mode()),
            (jail.uid(), jail.gid(), jail.mode()),
            "{why}"
        );
        assert!(s.sftp("a", "ls /\n").status.success(), "{why}: {}", s.log());
    };

    let out = prune(&s.group);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "group {} already holds account {} of another fleet",
            s.group,
            s.account("a")
        )) && err.contains("[server] group = "),
        "{err}"
    );
    untouched("refused in the shared group");

    let out = prune(&other_group);
    crate::common::sshd::remove_group(&other_group);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&s.account("a")),
        "{}",
        text(&out)
    );
    untouched("pruned in its own group");
}

/// A pruned host's jail is root:root 0700 before its account and group go, even when the
/// jail's group is no longer the account's: no id freed by the prune can read it later.
#[test]
fn a_pruned_jail_is_sealed_whatever_its_group() {
    let s = Sshd::start(&["a", "b"]);
    s.publish();
    // Someone changed b's jail group (to a group that will be freed, or reused, later).
    std::os::unix::fs::chown(s.host_dir("b"), None, Some(65534)).unwrap();
    s.write_toml(&[("a".to_owned(), Some(s.public_key("a")))]);
    let report = s.sync_accounts(true);
    assert!(report.contains("removed"), "{report}");
    let meta = fs::metadata(s.host_dir("b")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (0, 0, 0o700)
    );
}

/// Whatever a host plants in its `logs/` that no agent writes (setuid, world-writable,
/// links, FIFOs) is reported by `server check`, by path; removing it makes the check pass.
#[test]
fn check_reports_what_a_host_planted_in_its_logs() {
    let s = Sshd::start(&["a"]);
    s.publish();
    assert!(check(&s, &s.config()).status.success());
    let logs = s.host_dir("a").join("logs");
    let uid = fs::metadata(&logs).unwrap().uid();
    let planted = |name: &str, mode: u32| {
        let path = logs.join(name);
        fs::write(&path, "#!/bin/sh\n").unwrap();
        std::os::unix::fs::chown(&path, Some(uid), None).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    };
    let suid = planted("suid", 0o4755);
    let open = planted("open", 0o666);
    fs::write(logs.join("report.json"), "{}\n").unwrap();
    symlink("/etc/shadow", logs.join("shadow")).unwrap();
    fs::create_dir(logs.join("sub")).unwrap();
    unix::unistd::mkfifo(
        &logs.join("sub/pipe"),
        unix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();

    let bad = check(&s, &s.config());
    assert!(!bad.status.success(), "{}", text(&bad));
    let out = String::from_utf8_lossy(&bad.stdout).into_owned();
    assert!(out.contains("a       4 problems"), "{out}");
    for (path, what) in [
        (suid.clone(), "setuid"),
        (open.clone(), "world-writable"),
        (logs.join("shadow"), "a symbolic link"),
        (logs.join("sub/pipe"), "not a regular file"),
    ] {
        assert!(
            out.contains(&format!("{} is {what}", path.display())),
            "{what}: {out}"
        );
    }
    assert!(!out.contains("report.json"), "{out}");

    for p in [suid, open, logs.join("shadow"), logs.join("sub/pipe")] {
        fs::remove_file(p).unwrap();
    }
    assert!(check(&s, &s.config()).status.success());
}

/// The generated global settings limit what one source address can hold, and the
/// installed sshd accepts them and applies them (`sshd -T`).
#[test]
fn generated_config_limits_pre_auth_connections_per_source() {
    let s = Sshd::start(&["a"]);
    let printed = bento()
        .args(["server", "sshd-config", "--fleet"])
        .arg(s.fleet())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout).into_owned();
    let global = &printed[..printed.find("Match Group").unwrap()];
    assert!(global.contains("\nPerSourceMaxStartups 64\n"), "{printed}");
    let test = Command::new(crate::common::sshd::SSHD)
        .arg("-t")
        .arg("-f")
        .arg(s.config())
        .output()
        .unwrap();
    assert!(test.status.success(), "{}", text(&test));
    let effective = Command::new(crate::common::sshd::SSHD)
        .arg("-T")
        .arg("-f")
        .arg(s.config())
        .output()
        .unwrap();
    let effective = String::from_utf8_lossy(&effective.stdout);
    assert!(
        effective.lines().any(|l| l == "persourcemaxstartups 64"),
        "{effective}"
    );
}

/// A `Match` block read before bento's that can apply to the hosts' accounts (here an earlier
/// drop-in for an `sftp` group that also names `bento`) fails `server check`, naming its file
/// and line and the fix; the same block after bento's is harmless.
#[test]
fn check_fails_when_another_match_block_comes_before_bentos() {
    let s = Sshd::start(&["a"]);
    s.publish();
    let dropins = s.dir.join("sshd/sshd_config.d");
    fs::create_dir_all(&dropins).unwrap();
    let main = s.dir.join("sshd/with_dropins");
    fs::write(
        &main,
        format!(
            "Include {}/*.conf\n{}",
            dropins.display(),
            fs::read_to_string(s.config()).unwrap()
        ),
    )
    .unwrap();
    let other = dropins.join("10-sftp.conf");
    fs::write(
        &other,
        format!("Match Group sftp,{}\n    X11Forwarding no\n", s.group),
    )
    .unwrap();
    let bad = check(&s, &main);
    assert!(!bad.status.success(), "{}", text(&bad));
    let out = String::from_utf8_lossy(&bad.stdout).into_owned();
    assert!(
        out.contains(&format!("{}:1", other.display())) && out.contains("00-bento.conf"),
        "{out}"
    );
    // After bento's block (an included file read at the end), it changes nothing.
    fs::write(
        &main,
        format!(
            "{}\nInclude {}/*.conf\n",
            fs::read_to_string(s.config()).unwrap(),
            dropins.display()
        ),
    )
    .unwrap();
    let good = check(&s, &main);
    assert!(good.status.success(), "{}", text(&good));
}
