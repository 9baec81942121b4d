//! Hostile testing, round three, the server's side (issue #23): each test re-does an attack
//! over the real parts (sshd and its SFTP jails, Nix, age) and asserts the defended outcome.
//! docs/security.md's attack table names each test.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bento::protocol::layout::Chroot;
use bento::protocol::HostName;

use crate::common::faults::wait_until;
use crate::common::sshd::{wait_with_deadline, Sshd};
use crate::common::{bento, bento_std, unique_prefix, Accounts, FixtureFleet, ScratchDir};

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// C0 and C1 controls and the bidi/zero-width characters a terminal acts on (as
/// `sys::terminal::is_unsafe`), newlines and tabs of the output itself aside.
fn raw_controls(bytes: &[u8]) -> Vec<char> {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|&c| c != '\n' && c != '\t' && bento::sys::terminal::is_unsafe(c))
        .collect()
}

/// Uploads `bytes` as the host would, over its SFTP login, to `remote` (relative to its
/// jail); `mkdirs` are made first (errors ignored: they may exist).
fn upload(s: &Sshd, host: &str, mkdirs: &[&str], remote: &str, bytes: &[u8]) {
    let local = s.dir.join(format!("upload-{}", rand_tag()));
    fs::write(&local, bytes).unwrap();
    let mut batch = String::new();
    for d in mkdirs {
        batch.push_str(&format!("-mkdir {d}\n"));
    }
    batch.push_str(&format!("put {} \"{remote}\"\n", local.display()));
    let out = s.sftp(host, &batch);
    assert!(out.status.success(), "sftp put {remote:?}: {}", text(&out));
    let _ = fs::remove_file(local);
}

fn rand_tag() -> String {
    use rand::Rng;
    format!("{:08x}", rand::thread_rng().gen::<u32>())
}

// ---------------------------------------------------------------------------------------
// Item 3: escapes through `publish --wait` and `rollout`.

#[test]
fn a_heartbeat_with_escapes_reaches_no_terminal_through_wait_or_rollout() {
    let s = Sshd::start(&["h1"]);
    s.publish();
    // A heartbeat whose unknown field's name clears the screen and sets the window title:
    // serde quotes it in the parse error that becomes the host's status note.
    let field = "\u{1b}[2J\u{1b}]0;owned\u{7}";
    let hb = serde_json::json!({
        "format": 1, "host": "h1", "time": "2026-11-25T12:00:00Z", "version": null,
        "system": null, "last_outcome": null, "last_report": null, "agent_version": "0.1.0",
        field: 1,
    });
    upload(
        &s,
        "h1",
        &[],
        "logs/heartbeat.json",
        hb.to_string().as_bytes(),
    );

    let out = bento()
        .args(["publish", "--no-eval", "--wait=2s", "--fleet"])
        .arg(s.fleet())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("timed-out"), "{}", text(&out));
    assert!(
        stdout.contains("\\u{1b}[2J\\u{1b}]0;owned\\u{7}"),
        "{}",
        text(&out)
    );
    for stream in [&out.stdout, &out.stderr] {
        assert_eq!(raw_controls(stream), Vec::<char>::new(), "{}", text(&out));
    }

    // A rollout follows the same rows: its follower lines and its halt reason.
    let out = bento()
        .args([
            "rollout",
            "--waves",
            "100%",
            "--wait-timeout",
            "2s",
            "--fleet",
        ])
        .arg(s.fleet())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let all = [out.stdout.clone(), out.stderr.clone()].concat();
    assert!(
        String::from_utf8_lossy(&all).contains("\\u{1b}[2J"),
        "{}",
        text(&out)
    );
    assert_eq!(raw_controls(&all), Vec::<char>::new(), "{}", text(&out));
    let state = fs::read_to_string(s.chroot().join(".bento/rollout.json")).unwrap();
    assert!(
        !state.contains('\u{1b}'),
        "the halt reason is stored escaped: {state}"
    );
}

// ---------------------------------------------------------------------------------------
// Item 4: escapes through `bento log`; item 17: refused files make a host unknown, not new.

#[test]
fn a_report_file_named_with_escapes_is_one_escaped_unexpected_entry_in_log() {
    let s = Sshd::start(&["h1"]);
    s.publish();
    let evil = "\u{1b}[2J\u{1b}]0;owned\u{7}.json";
    upload(
        &s,
        "h1",
        &["logs/reports"],
        &format!("logs/reports/{evil}"),
        b"{}",
    );
    let out = bento()
        .args(["log", "h1", "--fleet"])
        .arg(s.fleet())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for stream in [&out.stdout, &out.stderr] {
        assert_eq!(raw_controls(stream), Vec::<char>::new(), "{}", text(&out));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("unexpected entry"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", text(&out));
    assert!(
        lines[0].contains("\\u{1b}[2J\\u{1b}]0;owned\\u{7}.json"),
        "{}",
        lines[0]
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("owned"),
        "never listed as a run: {}",
        text(&out)
    );
    // --json lists runs only: the name is not one.
    let out = bento()
        .args(["log", "h1", "--json", "--fleet"])
        .arg(s.fleet())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(runs, serde_json::json!([]));
}

#[test]
fn a_host_whose_report_files_are_all_refused_is_unknown_not_new() {
    let s = Sshd::start(&["h1"]);
    s.publish();
    let state = |s: &Sshd| -> String {
        let out = bento()
            .args(["status", "--json", "--fleet"])
            .arg(s.fleet())
            .output()
            .unwrap();
        let rows: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
        rows[0]["state"].as_str().unwrap().to_owned()
    };
    assert_eq!(state(&s), "new");
    upload(
        &s,
        "h1",
        &[],
        "logs/heartbeat.json",
        b"{\"format\": 1, garbage",
    );
    upload(&s, "h1", &[], "logs/latest.json", b"not json at all");
    assert_eq!(state(&s), "unknown");
}

// ---------------------------------------------------------------------------------------
// Item 1: a fleet-repo contributor's configuration reading the fleet's keys.

/// A fixture fleet (alpha, beta from a flake; classic1 classic) with accounts, signing and
/// cache keys outside the repo, publishing into its own chroot.
struct KeyedFleet {
    scratch: ScratchDir,
    keys: ScratchDir,
    fleet: FixtureFleet,
    _accounts: Accounts,
}

impl KeyedFleet {
    fn new(extra_hosts: &[&str], defaults: &str) -> Self {
        let scratch = ScratchDir::new();
        let keys = ScratchDir::new();
        let prefix = unique_prefix();
        let fleet = FixtureFleet::new(&scratch.join("fleet"), &prefix);
        let out = bento()
            .args(["keygen", "--output"])
            .arg(keys.join("signing"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let (cache, _) = crate::delivery::cache_key(&keys.path);
        let mut hosts = String::new();
        for h in extra_hosts {
            hosts.push_str(&format!("[hosts.{h}]\n"));
        }
        fleet.write(
            "bento.toml",
            &format!(
                "{defaults}[server]\naccount_prefix = \"{prefix}\"\nsigning_key = \"{}\"\ncache_key = \"{}\"\n\n[hosts.alpha]\n[hosts.beta]\n[hosts.classic1]\n{hosts}",
                keys.join("signing").display(),
                cache.display()
            ),
        );
        let mut all = vec!["alpha", "beta", "classic1"];
        all.extend(extra_hosts);
        let accounts = Accounts::create(&prefix, &all);
        Self {
            scratch,
            keys,
            fleet,
            _accounts: accounts,
        }
    }

    fn chroot(&self) -> Chroot {
        Chroot::new(self.scratch.join("chroot"))
    }

    /// `publish --json`: (exit code, host → row).
    fn publish(&self) -> (i32, serde_json::Value, String) {
        let out = bento()
            .args(["publish", "--json", "--fleet"])
            .arg(&self.fleet.root)
            .arg("--chroot")
            .arg(&self.chroot().root)
            .output()
            .unwrap();
        let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
        (out.status.code().unwrap_or(-1), json, text(&out))
    }

    /// Pieces of both keys that would show in any copy of them: each long line.
    fn key_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for f in ["signing", "cache-key"] {
            let t = fs::read_to_string(self.keys.join(f)).unwrap();
            lines.extend(t.lines().filter(|l| l.len() >= 20).map(str::to_owned));
        }
        assert!(lines.len() >= 2);
        lines
    }
}

fn row<'a>(json: &'a serde_json::Value, host: &str) -> &'a serde_json::Value {
    json.as_array()
        .unwrap()
        .iter()
        .find(|r| r["host"] == host)
        .unwrap_or_else(|| panic!("no row for {host}: {json}"))
}

/// Files under `dir` (not following links) whose bytes contain one of `needles`.
fn files_with(dir: &Path, needles: &[String]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return found;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            found.extend(files_with(&p, needles));
        } else if m.is_file() {
            let bytes = fs::read(&p).unwrap_or_default();
            let s = String::from_utf8_lossy(&bytes);
            if needles.iter().any(|n| s.contains(n.as_str())) {
                found.push(p);
            }
        }
    }
    found
}

/// Derivations in the store that hold one of `needles` (derivations are small files).
fn drvs_with(needles: &[String]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in fs::read_dir("/nix/store").unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "drv") {
            let s = fs::read_to_string(&p).unwrap_or_default();
            if needles.iter().any(|n| s.contains(n.as_str())) {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn a_classic_host_reading_the_fleet_keys_is_refused_and_leaves_them_nowhere() {
    let f = KeyedFleet::new(&[], "");
    f.fleet.write(
        "hosts/classic1/configuration.nix",
        &format!(
            "{{ ... }}: {{ hostName = \"classic1\"; payload = builtins.readFile {} + builtins.readFile {}; }}\n",
            f.keys.join("signing").display(),
            f.keys.join("cache-key").display()
        ),
    );
    let (code, json, out) = f.publish();
    assert_eq!(code, 1, "{out}");
    let r = row(&json, "classic1");
    assert_eq!(r["status"], "failed", "{out}");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("restricted mode"), "{error}");
    assert!(
        !f.chroot()
            .host_dir(&HostName::new("classic1").unwrap())
            .join("current")
            .exists(),
        "{out}"
    );
    // The other hosts are published, and nothing anywhere holds the keys.
    assert_eq!(row(&json, "alpha")["status"], "published", "{out}");
    let needles = f.key_lines();
    assert_eq!(
        files_with(&f.chroot().root, &needles),
        Vec::<PathBuf>::new()
    );
    assert_eq!(drvs_with(&needles), Vec::<PathBuf>::new());
    // The contributor's own files still work: classic1 imports ./common/base.nix.
    f.fleet.write(
        "hosts/classic1/configuration.nix",
        "{ ... }: { hostName = \"classic1\"; version = (import ./common/base.nix).version; }\n",
    );
    let (code, json, out) = f.publish();
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&json, "classic1")["status"], "published", "{out}");
}

/// A flake host whose *builder* copies the cache key at build time (the key file left
/// world-readable, so even Nix's build users can read it): the built system holds the key,
/// and it is refused before its closure is exported into the host's `cache/`.
#[test]
fn a_server_build_that_copies_a_readable_key_is_refused_before_export() {
    let f = KeyedFleet::new(&["leaky"], "[hosts.leaky.build_on]\n");
    // build_on for leaky only: rewrite the table we just wrote.
    let toml = fs::read_to_string(f.fleet.path("bento.toml"))
        .unwrap()
        .replace("[hosts.leaky.build_on]\n", "")
        .replace("[hosts.leaky]\n", "[hosts.leaky]\nbuild_on = \"server\"\n");
    f.fleet.write("bento.toml", &toml);
    let key = f.keys.join("cache-key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    f.fleet.write(
        "hosts/leaky/flake.nix",
        &format!(
            r#"{{
  outputs = {{ self }}: {{
    nixosConfigurations.leaky = {{
      config.system.build.toplevel = derivation {{
        name = "nixos-system-leaky-1";
        system = "x86_64-linux";
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        args = [ "-c" "mkdir -p $out/bin; cat {} > $out/payload; printf '#!/bin/sh\\n' > $out/bin/switch-to-configuration; chmod +x $out/bin/switch-to-configuration" ];
      }};
    }};
  }};
}}
"#,
            key.display()
        ),
    );
    let (code, json, out) = f.publish();
    assert_eq!(code, 1, "{out}");
    let r = row(&json, "leaky");
    assert_eq!(r["status"], "failed", "{out}");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("signing or cache key"), "{error}");
    let leaky = f.chroot().host_dir(&HostName::new("leaky").unwrap());
    assert!(!leaky.join("current").exists(), "{out}");
    let needles = f.key_lines();
    assert_eq!(
        files_with(&f.chroot().root, &needles),
        Vec::<PathBuf>::new()
    );
    // The built paths holding the key are gone from the world-readable store.
    for path in error
        .split([' ', ',', '(', ')'])
        .filter(|w| w.starts_with("/nix/store/"))
    {
        assert!(!Path::new(path).exists(), "{path} is still in the store");
    }
    assert_eq!(row(&json, "alpha")["status"], "published", "{out}");
}

// ---------------------------------------------------------------------------------------
// Item 13: the Nix cache secret key in a host's tree.

#[test]
fn a_nix_cache_secret_key_in_a_host_tree_is_refused() {
    let scratch = ScratchDir::new();
    let prefix = unique_prefix();
    let fleet = FixtureFleet::new(&scratch.join("fleet"), &prefix);
    let _accounts = Accounts::create(&prefix, &["alpha", "beta", "classic1"]);
    let (key, _) = crate::delivery::cache_key(&scratch.path);
    let secret = fs::read_to_string(&key).unwrap();
    // The key file as `nix key generate-secret` wrote it, next to the configuration.
    fleet.write("hosts/classic1/cache.secret", &secret);
    // And its base64 alone, pasted into a flake host's Nix file.
    let b64 = secret.trim().split_once(':').unwrap().1.to_owned();
    fleet.write(
        "hosts/multi/machines/beta.nix",
        &format!("{{ hostName = \"beta\"; payload = \"{b64}\"; }}\n"),
    );
    let out = bento()
        .args(["publish", "--no-eval", "--json", "--fleet"])
        .arg(&fleet.root)
        .arg("--chroot")
        .arg(scratch.join("chroot"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (host, file) in [
        ("classic1", "hosts/classic1/cache.secret"),
        ("beta", "hosts/multi/machines/beta.nix"),
    ] {
        let r = row(&json, host);
        assert_eq!(r["status"], "failed", "{r}");
        let e = r["error"].as_str().unwrap();
        assert!(e.contains(file) && e.contains("private key"), "{e}");
    }
    let found = files_with(&scratch.join("chroot"), &[b64]);
    assert_eq!(found, Vec::<PathBuf>::new());
}

// ---------------------------------------------------------------------------------------
// Item 14: a malformed rollout.json.

#[test]
fn a_malformed_rollout_state_is_refused_naming_the_file_and_a_new_rollout_replaces_it() {
    let s = Sshd::start(&["h1"]);
    s.publish();
    let state = s.chroot().join(".bento/rollout.json");
    // Halted "at" a wave that does not exist: the shape that panicked `--resume`.
    fs::write(
        &state,
        r#"{"format":1,"started":"2026-11-25T12:00:00Z","waves":[],"wave":0,"phase":"halted","halt":null}"#,
    )
    .unwrap();
    let out = bento()
        .args(["rollout", "--resume", "--fleet"])
        .arg(s.fleet())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(&state.display().to_string()), "{err}");
    assert!(err.contains("without --resume"), "{err}");
    // Status still works, and says what is wrong.
    let out = bento()
        .args(["status", "--fleet"])
        .arg(s.fleet())
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        text(&out)
    );
    // A new rollout is not blocked: it replaces the broken file, saying so.
    let out = bento()
        .args([
            "rollout",
            "--waves",
            "100%",
            "--wait-timeout",
            "1s",
            "--fleet",
        ])
        .arg(s.fleet())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("replacing"), "{}", text(&out));
    let saved: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(saved["waves"][0]["selector"], "100%", "{saved}");
}

// ---------------------------------------------------------------------------------------
// Item 16: logs/ without bound.

#[test]
fn server_check_flags_a_host_whose_logs_exceed_the_limit() {
    let s = Sshd::start(&["h1"]);
    s.publish();
    upload(&s, "h1", &[], "logs/filler", &vec![b'x'; 3 << 20]);
    let check = |limit: &str| {
        bento()
            .args(["server", "check", "--fleet"])
            .arg(s.fleet())
            .arg("--sshd-config")
            .arg(s.config())
            .arg("--sshd")
            .arg(crate::common::sshd::SSHD)
            .args(["--logs-limit", limit])
            .output()
            .unwrap()
    };
    let out = check("1M");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("/logs uses") && all.contains("quota"), "{all}");
    let out = check("64M");
    assert!(!text(&out).contains("/logs uses"), "{}", text(&out));
}

// ---------------------------------------------------------------------------------------
// Item 9: two fleets sharing a chroot root.

#[test]
fn a_second_fleet_on_the_same_chroot_cannot_take_a_jail() {
    let s = Sshd::start(&["h1"]);
    s.publish();
    let jail = s.host_dir("h1");
    let before = fs::metadata(&jail).unwrap();
    let other = ScratchDir::new();
    let other_prefix = unique_prefix();
    let (_, other_key) = {
        let key = other.join("k");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(st.success());
        (
            key.clone(),
            fs::read_to_string(key.with_extension("pub"))
                .unwrap()
                .trim()
                .to_owned(),
        )
    };
    fs::create_dir_all(other.join("fleet")).unwrap();
    fs::write(
        other.join("fleet/bento.toml"),
        format!(
            "[server]\nchroot = \"{}\"\nauthorized_keys_dir = \"{}\"\naccount_prefix = \"{other_prefix}\"\ngroup = \"{}\"\n\n[hosts.h1]\nkey = \"{other_key}\"\n",
            s.chroot().display(),
            s.keys_dir().display(),
            s.group
        ),
    )
    .unwrap();
    let _other_accounts = Accounts {
        names: vec![format!("{other_prefix}h1")],
    };
    let sync_other = || {
        bento()
            .args(["server", "sync-accounts", "--fleet"])
            .arg(other.join("fleet"))
            .output()
            .unwrap()
    };
    let unchanged = |why: &str| {
        let after = fs::metadata(&jail).unwrap();
        assert_eq!(
            (after.uid(), after.gid(), after.mode()),
            (before.uid(), before.gid(), before.mode()),
            "{why}"
        );
        assert!(
            s.sftp("h1", "ls /\n").status.success(),
            "{why}: {}",
            s.log()
        );
    };
    // The chroot is marked as the first fleet's: the second is refused outright.
    let out = sync_other();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&s.prefix) && err.contains("own [server] chroot"),
        "{err}"
    );
    assert!(bento::sys::accounts::user(&format!("{other_prefix}h1"))
        .unwrap()
        .is_none());
    unchanged("after the marked refusal");
    // Without the mark (an older chroot), the jail itself is refused: its group is another
    // existing account's.
    fs::remove_file(s.chroot().join(".bento/fleet")).unwrap();
    let out = sync_other();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("jail of account {}", s.account("h1"))),
        "{err}"
    );
    unchanged("after the jail refusal");

    // The first fleet's own sync says what it puts right.
    std::os::unix::fs::chown(jail.join("logs"), Some(0), Some(0)).unwrap();
    let report = s.sync_accounts(false);
    assert!(report.contains("logs: owner 0:0"), "{report}");
    unchanged("after the owner's sync");
}

// ---------------------------------------------------------------------------------------
// Item 8: `bento secret edit` and signals.

/// Every file under /dev/shm/bento-secret-* holding `marker`, and the directories made by
/// `pid`.
fn plaintext_left(marker: &str, pid: u32) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for e in fs::read_dir("/dev/shm").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("bento-secret-") {
            continue;
        }
        if name.starts_with(&format!("bento-secret-{pid}-")) {
            left.push(e.path());
        }
        left.extend(files_with(&e.path(), &[marker.to_owned()]));
    }
    left
}

#[test]
fn secret_edit_leaves_no_plaintext_whatever_signal_ends_it() {
    let s = Sshd::start(&["alpha"]);
    let admin = s.dir.join("admin");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&admin)
        .status()
        .unwrap();
    assert!(st.success());
    let admin_pub = fs::read_to_string(admin.with_extension("pub")).unwrap();
    let toml = s.fleet().join("bento.toml");
    let mut t = fs::read_to_string(&toml).unwrap();
    t.push_str(&format!(
        "\n[secrets]\nrecipients = [\"{}\"]\n",
        admin_pub.trim()
    ));
    fs::write(&toml, t).unwrap();
    // A directory a killed bento left behind (its pid no longer runs): removed on the next
    // run.
    let stale = PathBuf::from(format!("/dev/shm/bento-secret-0-{}", rand_tag()));
    fs::create_dir(&stale).unwrap();
    fs::write(stale.join("wg0.key"), "stale plaintext").unwrap();

    let marker = format!("PLAINTEXT-{}", rand_tag());
    let flag = s.dir.join("editor-started");
    let editor = s.dir.join("editor.sh");
    fs::write(
        &editor,
        format!(
            "#!/bin/sh\nprintf '{marker}' >> \"$1\"\nstat -c %a \"$(dirname \"$1\")\" > {flag}.mode\ntouch {flag}\nsleep 2\n",
            flag = flag.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&editor, fs::Permissions::from_mode(0o755)).unwrap();
    for (sig, name, writes) in [
        (libc::SIGINT, "SIGINT", true),
        (libc::SIGQUIT, "SIGQUIT", true),
        (libc::SIGHUP, "SIGHUP", false),
        (libc::SIGTERM, "SIGTERM", false),
    ] {
        let _ = fs::remove_file(&flag);
        let mut child = bento_std()
            .args(["secret", "edit", "alpha", "etc/wg0.key", "--identity"])
            .arg(&admin)
            .arg("--fleet")
            .arg(s.fleet())
            .env("EDITOR", &editor)
            .env_remove("VISUAL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let started = wait_until(Duration::from_secs(30), || {
            flag.exists() || child.try_wait().is_ok_and(|s| s.is_some())
        });
        if !flag.exists() {
            let out = wait_with_deadline(child, Duration::from_secs(5));
            panic!("{name}: the editor did not start ({started}): {out:?}");
        }
        assert_eq!(
            fs::read_to_string(flag.with_extension("mode"))
                .unwrap()
                .trim(),
            "700",
            "{name}: the directory is private"
        );
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
        let started = Instant::now();
        let out = wait_with_deadline(child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{name}: bento did not end"));
        assert!(started.elapsed() < Duration::from_secs(30));
        assert_eq!(
            plaintext_left(&marker, pid),
            Vec::<PathBuf>::new(),
            "{name}: {}",
            text(&out)
        );
        assert_eq!(out.status.success(), writes, "{name}: {}", text(&out));
        if !writes {
            assert!(
                String::from_utf8_lossy(&out.stderr).contains(name),
                "{name}: {}",
                text(&out)
            );
        }
    }
    assert!(!stale.exists(), "the stale directory is removed");
}

// ---------------------------------------------------------------------------------------
// Item 10: sessions per host account.

/// Processes whose real uid is `uid`.
fn processes_of(uid: u32) -> usize {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            fs::read_to_string(e.path().join("status")).is_ok_and(|st| {
                st.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .is_some_and(|u| u == uid.to_string())
            })
        })
        .count()
}

#[test]
fn concurrent_logins_as_one_host_account_are_capped() {
    use std::io::Write as _;
    let s = Sshd::start(&["h1", "h2"]);
    s.publish();
    // What sync-accounts wrote for PAM; the generated sshd config says where the cap is.
    let limits = fs::read_to_string(bento::server::provision::limits_file(&s.group)).unwrap();
    assert!(
        limits.contains(&format!("@{} hard nproc 16", s.group)),
        "{limits}"
    );
    // The same jails served by an sshd with PAM on (Debian's default), as an operator runs it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = s.dir.join("sshd/sshd_config_pam");
    fs::write(
        &config,
        fs::read_to_string(s.config())
            .unwrap()
            .replace("UsePAM no", "UsePAM yes")
            .replace(&format!("Port {}\n", s.port), &format!("Port {port}\n")),
    )
    .unwrap();
    // The same host key on the new port.
    let known = fs::read_to_string(s.known_hosts()).unwrap();
    let key = known.split_once(' ').unwrap().1.to_owned();
    fs::write(s.known_hosts(), format!("{known}[127.0.0.1]:{port} {key}")).unwrap();
    let log = fs::File::create(s.dir.join("sshd/pam.log")).unwrap();
    let mut sshd = Command::new(crate::common::sshd::SSHD)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill(Vec<std::process::Child>);
    impl Drop for Kill {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));
    let opts = |host: &str| -> Vec<String> {
        s.client_opts(host)
            .into_iter()
            .map(|o| {
                if o.starts_with("Port=") {
                    format!("Port={port}")
                } else {
                    o
                }
            })
            .collect()
    };
    // Each client's stdout goes to a file: sftp in batch mode echoes its first command once
    // it has a session, so a client that printed nothing is still waiting at sshd's door.
    let out = |host: &str, i: usize| s.dir.join(format!("sshd/login-{host}-{i}.out"));
    let login = |host: &str, i: usize| {
        let mut c = Command::new("sftp")
            .args(["-b", "-"])
            .args(opts(host))
            .arg("127.0.0.1")
            .stdin(Stdio::piped())
            .stdout(fs::File::create(out(host, i)).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // One command, then the session stays open (stdin is not closed).
        c.stdin.as_mut().unwrap().write_all(b"ls /\n").unwrap();
        c
    };
    // One login works with PAM on.
    let mut one = login("h2", 0);
    let ok = wait_until(Duration::from_secs(10), || {
        processes_of(
            bento::sys::accounts::user(&s.account("h2"))
                .unwrap()
                .unwrap()
                .uid,
        ) >= 2
    });
    assert!(
        ok,
        "no PAM login: {}",
        fs::read_to_string(s.dir.join("sshd/pam.log")).unwrap()
    );
    let _ = one.kill();
    let _ = one.wait();

    let uid = bento::sys::accounts::user(&s.account("h1"))
        .unwrap()
        .unwrap()
        .uid;
    let mut storm = Kill((0..40).map(|i| login("h1", i)).collect());
    // Settle: every login has either got its session or been turned away. A loaded machine
    // can keep logins at the door for seconds, so waiting ones are not counted as held.
    let has_session = |i: usize| fs::metadata(out("h1", i)).is_ok_and(|m| m.len() > 0);
    let deadline = Instant::now() + Duration::from_secs(90);
    let (held, waiting) = loop {
        std::thread::sleep(Duration::from_millis(500));
        let (held, waiting): (Vec<usize>, Vec<usize>) = storm
            .0
            .iter_mut()
            .enumerate()
            .filter_map(|(i, c)| matches!(c.try_wait(), Ok(None)).then_some(i))
            .partition(|&i| has_session(i));
        if waiting.is_empty() || Instant::now() > deadline {
            break (held, waiting);
        }
    };
    assert!(
        waiting.is_empty(),
        "{} logins neither served nor turned away after 90 s",
        waiting.len()
    );
    let procs = processes_of(uid);
    let alive = held.len();
    eprintln!("40 concurrent logins as one host account: {alive} sessions held, {procs} processes");
    assert!(procs <= 16, "{procs} processes as the account");
    assert!((1..=8).contains(&alive), "{alive} sessions held");
    // Another host is not starved by h1's storm.
    let mut other = login("h2", 1);
    let h2 = bento::sys::accounts::user(&s.account("h2"))
        .unwrap()
        .unwrap()
        .uid;
    assert!(wait_until(Duration::from_secs(10), || processes_of(h2) >= 2));
    let _ = other.kill();
    let _ = other.wait();
    drop(storm);
    let _ = sshd.kill();
    let _ = sshd.wait();
}
