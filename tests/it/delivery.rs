//! Issue #12, server side, over real Nix on the toy fleet: the evaluation gate (a host that
//! does not evaluate is held back, named with its fleet-repo file and line), no churn between
//! `publish` and `publish --build`, and `build_on = "server"` hosts getting a signed binary
//! cache in `<host>/cache/` whose NARs are stored once.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bento::protocol::layout::Chroot;
use bento::protocol::narinfo::{self, CacheKeys, NarInfo};
use bento::protocol::HostName;
use bento::server::publish::read_current;
use sha2::Digest as _;

use crate::common::{bento, unique_prefix, Accounts, FixtureFleet, ScratchDir, NIX_CONFIG};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/toy")
}

struct Env {
    scratch: ScratchDir,
    fleet: FixtureFleet,
    _accounts: Accounts,
}

impl Env {
    fn new(extra_toml: &str) -> Self {
        let scratch = ScratchDir::new();
        let prefix = unique_prefix();
        let fleet = FixtureFleet::new(&scratch.join("fleet"), &prefix);
        let toml = fs::read_to_string(fleet.path("bento.toml")).unwrap();
        fleet.write("bento.toml", &format!("{extra_toml}\n{toml}"));
        let accounts = Accounts::create(&prefix, &["alpha", "beta", "classic1"]);
        Self {
            scratch,
            fleet,
            _accounts: accounts,
        }
    }

    fn chroot(&self) -> Chroot {
        Chroot::new(self.scratch.join("chroot"))
    }

    fn host_dir(&self, host: &str) -> PathBuf {
        self.chroot().host_dir(&HostName::new(host).unwrap())
    }

    fn bento(&self, args: &[&str]) -> assert_cmd::Command {
        let mut cmd = bento();
        cmd.env(
            "NIX_PATH",
            format!("nixpkgs={}", fixtures().join("nixpkgs").display()),
        )
        .arg("--fleet")
        .arg(&self.fleet.root)
        .args(args)
        .arg("--chroot")
        .arg(&self.chroot().root);
        cmd
    }

    fn fleet_record(&self, host: &str) -> bento::nix::StorePath {
        bento::server::build::record::read(&self.chroot(), &HostName::new(host).unwrap())
            .unwrap()
            .and_then(|r| r.system)
            .expect("a build record")
    }

    /// `publish --json …`: (exit code, host → (status, error)).
    fn publish(&self, args: &[&str]) -> (i32, serde_json::Value) {
        let out = self
            .bento(&[&["publish", "--json"], args].concat())
            .output()
            .unwrap();
        let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "no JSON: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), json)
    }
}

fn row<'a>(json: &'a serde_json::Value, host: &str) -> &'a serde_json::Value {
    json.as_array()
        .unwrap()
        .iter()
        .find(|r| r["host"] == host)
        .unwrap_or_else(|| panic!("no row for {host}: {json}"))
}

fn nix(args: &[&str]) -> std::process::Output {
    Command::new("nix")
        .args(["--extra-experimental-features", "nix-command flakes"])
        .args(args)
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap()
}

#[test]
fn a_host_that_does_not_evaluate_is_held_back_and_named_with_its_file_and_line() {
    let env = Env::new("");
    env.fleet.write(
        "hosts/classic1/configuration.nix",
        "{ ... }: {\n  hostName = \"classic1\"\n  version = \"1\"; }\n",
    );
    env.fleet.write(
        "hosts/multi/machines/beta.nix",
        "{ hostName = 1 + \"b\"; }\n",
    );
    let (code, json) = env.publish(&[]);
    assert_eq!(code, 1, "{json}");
    assert_eq!(row(&json, "alpha")["status"], "published");
    for (host, at, what) in [
        (
            "classic1",
            "hosts/classic1/configuration.nix:3:",
            "syntax error",
        ),
        ("beta", "hosts/multi/machines/beta.nix:1:", "cannot add"),
    ] {
        let r = row(&json, host);
        assert_eq!(r["status"], "failed", "{r}");
        let error = r["error"].as_str().unwrap();
        assert!(
            error.contains(at) && error.contains(what),
            "{host}: {error}"
        );
        assert!(
            !error.contains("/nix/store") && !error.contains("/tmp/"),
            "{error}"
        );
        assert!(
            read_current(&env.host_dir(host)).is_none(),
            "{host} went live"
        );
    }
    // The table says the same.
    let out = env
        .bento(&["publish"])
        .assert()
        .code(1)
        .get_output()
        .clone();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("classic1") && l.contains("hosts/classic1/configuration.nix:3:")),
        "{text}"
    );
    // bento build names the same place.
    let out = env
        .bento(&["build", "--host", "classic1"])
        .assert()
        .code(1)
        .get_output()
        .clone();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("hosts/classic1/configuration.nix:3:"),
        "{text}"
    );
    assert!(!text.contains("bento-build-"), "{text}");
    // --no-eval publishes it anyway.
    let (code, json) = env.publish(&["--no-eval"]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(row(&json, "classic1")["status"], "published");
}

#[test]
fn publishing_with_and_without_build_gives_no_host_a_new_version() {
    for first_build in [true, false] {
        let env = Env::new("");
        let digests = || -> Vec<String> {
            ["alpha", "beta", "classic1"]
                .iter()
                .map(|h| read_current(&env.host_dir(h)).unwrap().0.to_hex())
                .collect()
        };
        let sequence: &[&[&str]] = if first_build {
            &[&["--build"], &[], &["--build"], &[]]
        } else {
            &[&[], &["--build"], &[], &["--build"]]
        };
        let (code, json) = env.publish(sequence[0]);
        assert_eq!(code, 0, "{json}");
        let first = digests();
        for args in &sequence[1..] {
            let (code, json) = env.publish(args);
            assert_eq!(code, 0, "{json}");
            for r in json.as_array().unwrap() {
                assert_eq!(r["status"], "unchanged", "{args:?}: {r}");
            }
            assert_eq!(digests(), first, "{args:?}");
        }
        // Whichever came first, status knows what each host should run.
        let out = env
            .bento(&["status", "--json"])
            .assert()
            .success()
            .get_output()
            .clone();
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for r in rows.as_array().unwrap() {
            assert!(r["expected_system"].as_str().is_some(), "{r}");
        }
        // A real change is still a new version.
        env.fleet.write("common/base.nix", "{ version = \"2\"; }\n");
        let (_, json) = env.publish(&[]);
        assert_eq!(row(&json, "alpha")["status"], "published");
    }
}

/// A Nix cache key pair outside the fleet repo: (secret path, public key).
pub(crate) fn cache_key(dir: &Path) -> (PathBuf, String) {
    let out = nix(&["key", "generate-secret", "--key-name", "bento-test-1"]);
    assert!(out.status.success());
    let secret = dir.join("cache-key");
    fs::write(&secret, &out.stdout).unwrap();
    let public = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "key",
            "convert-secret-to-public",
        ])
        .stdin(fs::File::open(&secret).unwrap())
        .output()
        .unwrap();
    (
        secret,
        String::from_utf8(public.stdout).unwrap().trim().to_owned(),
    )
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn server_built_hosts_get_a_signed_binary_cache_with_shared_nars_stored_once() {
    let keys = ScratchDir::new();
    let (secret, public) = cache_key(keys.path.as_path());
    let env = Env::new(&format!(
        "[defaults]\nbuild_on = \"server\"\n[server]\ncache_key = \"{}\"\n",
        secret.display()
    ));
    // The fixture's [server] table comes second: merge it into ours.
    let toml = fs::read_to_string(env.fleet.path("bento.toml")).unwrap();
    env.fleet.write(
        "bento.toml",
        &toml.replacen("\n[server]\naccount_prefix", "\naccount_prefix", 1),
    );
    let (code, json) = env.publish(&[]);
    assert_eq!(code, 0, "{json}");
    let trusted = CacheKeys::parse(&[&public]).unwrap();
    let mut nar_inodes = Vec::new();
    for host in ["alpha", "beta", "classic1"] {
        let dir = env.host_dir(host);
        let (_, m) = read_current(&dir).unwrap();
        let system = m.system.expect("server-built hosts name their system");
        let cache = dir.join("cache");
        assert!(fs::read_to_string(cache.join("nix-cache-info"))
            .unwrap()
            .contains("StoreDir: /nix/store"));
        let meta = fs::metadata(&cache).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o755));
        // bento's own reader accepts what Nix wrote: signatures, NAR files, the closure.
        let fetch = |h: &str| fs::read_to_string(cache.join(format!("{h}.narinfo")));
        let infos = narinfo::missing(system.as_str(), &trusted, |_| false, fetch).unwrap();
        let closure = nix(&["path-info", "--recursive", system.as_str()]);
        let want: BTreeSet<String> = String::from_utf8(closure.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        let got: BTreeSet<String> = infos.iter().map(|i| i.store_path.clone()).collect();
        assert_eq!(got, want, "{host}");
        for info in &infos {
            assert_eq!(info.compression, "zstd");
            let nar = fs::read(cache.join(&info.url)).unwrap();
            let sha: [u8; 32] = sha2::Sha256::digest(&nar).into();
            info.check_file(&sha, nar.len() as u64).unwrap();
            let ino = fs::metadata(cache.join(&info.url)).unwrap().ino();
            nar_inodes.push((info.store_path.clone(), ino));
        }
        // The host never substitutes a path not present: a narinfo is a regular file.
        assert!(NarInfo::parse(&fetch(narinfo::hash_part(system.as_str())).unwrap()).is_ok());

        // Nix itself accepts the cache with the public key.
        let store = keys.path.join(format!("store-{host}"));
        let from = format!("file://{}", cache.display());
        let out = nix(&[
            "copy",
            "--from",
            &from,
            "--to",
            store.to_str().unwrap(),
            "--option",
            "trusted-public-keys",
            &public,
            system.as_str(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(store.join(system.as_str().trim_start_matches('/')).exists());
    }
    // The kernel all three share: one inode.
    let kernel: BTreeSet<u64> = nar_inodes
        .iter()
        .filter(|(p, _)| p.ends_with("-linux-6.1.0"))
        .map(|(_, i)| *i)
        .collect();
    assert_eq!(kernel.len(), 1, "{nar_inodes:?}");
    assert_eq!(
        nar_inodes
            .iter()
            .filter(|(p, _)| p.ends_with("-linux-6.1.0"))
            .count(),
        3
    );

    // A tampered NAR fails Nix's verification (on a copy: the original is shared).
    let copy = keys.path.join("tampered");
    let st = Command::new("cp")
        .args(["-r"])
        .arg(env.host_dir("alpha").join("cache"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    let (_, m) = read_current(&env.host_dir("alpha")).unwrap();
    let system = m.system.unwrap();
    let info = NarInfo::parse(
        &fs::read_to_string(copy.join(format!("{}.narinfo", narinfo::hash_part(system.as_str()))))
            .unwrap(),
    )
    .unwrap();
    let nar_path = copy.join(&info.url);
    let mut nar = fs::read(&nar_path).unwrap();
    let last = nar.len() - 1;
    nar[last] ^= 0xff;
    fs::write(&nar_path, &nar).unwrap();
    let out = nix(&[
        "copy",
        "--from",
        &format!("file://{}", copy.display()),
        "--to",
        keys.path.join("store-tampered").to_str().unwrap(),
        "--option",
        "trusted-public-keys",
        &public,
        system.as_str(),
    ]);
    assert!(!out.status.success(), "a tampered NAR was accepted");

    // Old cache entries go with their manifests: after four more versions of alpha, its
    // cache holds only the closures of the three manifests it keeps, and the pool nothing
    // no host links to.
    let mut systems = Vec::new();
    for v in 2..=5 {
        env.fleet.write(
            "hosts/multi/machines/alpha.nix",
            &format!("{{ hostName = \"alpha\"; payload = \"v{v}\"; }}\n"),
        );
        let (code, json) = env.publish(&["--host", "alpha"]);
        assert_eq!(code, 0, "{json}");
        systems.push(
            read_current(&env.host_dir("alpha"))
                .unwrap()
                .1
                .system
                .unwrap(),
        );
    }
    let cache = env.host_dir("alpha").join("cache");
    let names: BTreeSet<String> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".narinfo"))
        .collect();
    let mut want = BTreeSet::new();
    for s in &systems[1..] {
        let out = nix(&["path-info", "--recursive", s.as_str()]);
        for p in String::from_utf8(out.stdout).unwrap().lines() {
            want.insert(format!("{}.narinfo", narinfo::hash_part(p)));
        }
    }
    assert_eq!(names, want);
    for f in files_under(&env.chroot().state_dir().join("cache")) {
        if f.file_name().unwrap() != "nix-cache-info" {
            assert!(
                fs::metadata(&f).unwrap().nlink() > 1,
                "{} is linked by no host",
                f.display()
            );
        }
    }
}

#[test]
fn build_and_diff_preview_the_working_tree_before_anything_is_published() {
    let env = Env::new("");
    // A fresh server: nothing published, no chroot yet. bento build works on the tree.
    env.bento(&["build", "--host", "alpha"]).assert().success();
    let gen1 = env.fleet_record("alpha");
    // alpha reports it runs version 1.
    let logs = env.host_dir("alpha").join("logs");
    fs::create_dir_all(&logs).unwrap();
    let hb = bento::protocol::report::Heartbeat {
        format: 1,
        host: HostName::new("alpha").unwrap(),
        time: bento::protocol::Timestamp::seconds(std::time::SystemTime::now()),
        version: None,
        system: Some(gen1.to_string()),
        last_outcome: None,
        last_report: None,
        agent_version: "0.1.0".into(),
        reboot_pending: false,
        auto_updated: false,
        last_success: None,
        verifies_signatures: None,
        serial: None,
        stale: None,
        clock_offset_s: None,
        formats: vec![],
    };
    fs::write(logs.join("heartbeat.json"), hb.to_bytes()).unwrap();
    let diff = || {
        env.bento(&["diff", "--host", "alpha"])
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .output()
            .unwrap()
    };
    let out = diff();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("runs the expected system"), "{text}");

    // Edit the tree: diff says it is not built yet; after bento build it shows the change.
    // A version of its own: the store outlives test runs, and a system some other run built
    // would rightly count as built.
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    env.fleet.write(
        "common/base.nix",
        &format!("{{ version = \"2.{unique}\"; }}\n"),
    );
    let out = diff();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("is not built (run `bento build`)"), "{text}");
    env.bento(&["build", "--host", "alpha"]).assert().success();
    let out = diff();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines().any(|l| l.contains("changed")
            && l.contains("nixos-system-alpha")
            && l.contains("1 → 2")),
        "{text}"
    );
    assert!(
        read_current(&env.host_dir("alpha")).is_none(),
        "nothing was published"
    );
    // A tree that does not evaluate is named with its file.
    env.fleet
        .write("hosts/multi/machines/alpha.nix", "{ hostName = ; }\n");
    let text = String::from_utf8(diff().stdout).unwrap();
    assert!(text.contains("hosts/multi/machines/alpha.nix:1:"), "{text}");
}
