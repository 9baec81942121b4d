//! `bento publish` on fixture fleets, as root with real accounts and real Nix evaluation
//! of flake directories.

use std::fs;
use std::os::unix::fs::MetadataExt;

use bento::protocol::manifest::{Build, ConfigEntry, Manifest};
use bento::protocol::HostName;
use bento::server::publish::verify_host;
use serde_json::Value;

use crate::common::{
    bento, chroot_fingerprint, tree_fingerprint, unique_prefix, Accounts, FixtureFleet, ScratchDir,
};

const HOSTS: [&str; 3] = ["alpha", "beta", "classic1"];

struct Env {
    scratch: ScratchDir,
    fleet: FixtureFleet,
    _accounts: Accounts,
    prefix: String,
}

impl Env {
    fn new() -> Self {
        let scratch = ScratchDir::new();
        let prefix = unique_prefix();
        let fleet = FixtureFleet::new(&scratch.join("fleet"), &prefix);
        let accounts = Accounts::create(&prefix, &HOSTS);
        Self {
            scratch,
            fleet,
            _accounts: accounts,
            prefix,
        }
    }

    fn chroot(&self) -> std::path::PathBuf {
        self.scratch.join("chroot")
    }

    fn publish(&self, extra: &[&str]) -> assert_cmd::assert::Assert {
        bento()
            .arg("--fleet")
            .arg(&self.fleet.root)
            .arg("publish")
            .arg("--chroot")
            .arg(self.chroot())
            .args(extra)
            .assert()
    }

    fn publish_json(&self) -> Vec<Value> {
        let out = self
            .publish(&["--json"])
            .success()
            .get_output()
            .stdout
            .clone();
        serde_json::from_slice::<Vec<Value>>(&out).expect("publish --json prints a JSON array")
    }

    fn manifest(&self, host: &str) -> Manifest {
        let dir = self.chroot().join(host);
        let digest = verify_host(&dir, &HostName::new(host).unwrap())
            .expect("published version verifies")
            .expect("host has a version");
        Manifest::parse(&fs::read(bento::protocol::layout::manifest(&dir, &digest)).unwrap())
            .unwrap()
    }
}

fn statuses(reports: &[Value]) -> Vec<(String, String)> {
    reports
        .iter()
        .map(|r| {
            (
                r["host"].as_str().unwrap().to_owned(),
                r["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn publishes_classic_and_flake_hosts_with_secrets_kept_out_of_config() {
    let env = Env::new();
    let reports = env.publish_json();
    assert_eq!(
        statuses(&reports),
        pairs(&[
            ("alpha", "published"),
            ("beta", "published"),
            ("classic1", "published")
        ])
    );

    let alpha = env.manifest("alpha");
    assert_eq!(alpha.build, Build::Flake);
    let paths: Vec<&str> = alpha.config.iter().map(|e| e.path().as_str()).collect();
    assert!(paths.contains(&"flake.nix"));
    assert!(
        paths.contains(&"common/lib.nix"),
        "symlinked common/ is resolved: {paths:?}"
    );
    assert!(alpha.files.is_empty());

    let classic = env.manifest("classic1");
    assert_eq!(classic.build, Build::Classic);
    assert!(
        classic
            .config
            .iter()
            .all(|e| !e.path().as_str().starts_with("files") && e.path().as_str() != "files.toml"),
        "files/ must never be in config: {:?}",
        classic.config
    );
    assert_eq!(classic.files.len(), 1);
    let secret = &classic.files[0];
    assert_eq!(secret.target.as_str(), "/etc/bento-test/secret");
    assert_eq!(secret.mode.to_string(), "0640");
    assert_eq!(
        (secret.owner.as_str(), secret.group.as_str()),
        ("root", "root")
    );
    assert_eq!(
        secret.sha256,
        bento::protocol::manifest::Digest::of(b"s3cret-classic1\n")
    );
    // The secret's object exists for classic1 only.
    let obj = bento::protocol::layout::object(&env.chroot().join("classic1"), &secret.sha256);
    assert_eq!(fs::read(obj).unwrap(), b"s3cret-classic1\n");
    assert!(!bento::protocol::layout::object(&env.chroot().join("alpha"), &secret.sha256).exists());

    // Ownership as root: the host dir is the gate, logs/ belongs to the account.
    let acct = bento::sys::accounts::user(&format!("{}classic1", env.prefix))
        .unwrap()
        .unwrap();
    let host_dir = fs::metadata(env.chroot().join("classic1")).unwrap();
    assert_eq!(
        (host_dir.uid(), host_dir.gid(), host_dir.mode() & 0o7777),
        (0, acct.gid, 0o750)
    );
    let logs = fs::metadata(env.chroot().join("classic1/logs")).unwrap();
    assert_eq!((logs.uid(), logs.mode() & 0o7777), (acct.uid, 0o750));
    let root = fs::metadata(env.chroot()).unwrap();
    assert_eq!((root.uid(), root.mode() & 0o022), (0, 0));

    // Shared files are stored once: alpha's and beta's lib.nix are the same inode.
    let lib = alpha
        .config
        .iter()
        .find_map(|e| match e {
            ConfigEntry::File { path, sha256, .. } if path.as_str() == "common/lib.nix" => {
                Some(*sha256)
            }
            _ => None,
        })
        .unwrap();
    let a = fs::metadata(bento::protocol::layout::object(
        &env.chroot().join("alpha"),
        &lib,
    ))
    .unwrap();
    let b = fs::metadata(bento::protocol::layout::object(
        &env.chroot().join("beta"),
        &lib,
    ))
    .unwrap();
    assert_eq!(a.ino(), b.ino());
}

#[test]
fn unchanged_publish_writes_nothing() {
    let env = Env::new();
    env.publish_json();
    let before = chroot_fingerprint(&env.chroot());
    let mtime = |h: &str| {
        fs::metadata(env.chroot().join(h).join("current"))
            .unwrap()
            .mtime_nsec()
    };
    let m0 = mtime("alpha");
    let reports = env.publish_json();
    assert_eq!(
        statuses(&reports),
        pairs(&[
            ("alpha", "unchanged"),
            ("beta", "unchanged"),
            ("classic1", "unchanged")
        ])
    );
    assert!(reports.iter().all(|r| r["bytes"] == 0));
    assert_eq!(chroot_fingerprint(&env.chroot()), before);
    assert_eq!(mtime("alpha"), m0, "current was not rewritten");
}

#[test]
fn changing_a_common_module_republishes_exactly_its_users() {
    let env = Env::new();
    // A host that does not link common/.
    env.fleet.write(
        "hosts/lonely/configuration.nix",
        "{ ... }: { hostName = \"lonely\"; }\n",
    );
    let _lonely = Accounts::create(&env.prefix, &["lonely"]);
    env.publish_json();

    env.fleet.write("common/base.nix", "{ version = \"2\"; }\n");
    let reports = env.publish_json();
    assert_eq!(
        statuses(&reports),
        pairs(&[
            ("alpha", "published"),
            ("beta", "published"),
            ("classic1", "published"),
            ("lonely", "unchanged")
        ])
    );
    // Exactly one new object per changed host (base.nix), plus the manifest.
    for r in &reports[..3] {
        assert_eq!(r["new_objects"], 1, "{r}");
    }

    // A change inside one host's own directory touches only that host: its flake sibling
    // evaluates to the same system and keeps its version.
    env.fleet.write(
        "hosts/multi/machines/beta.nix",
        "{ hostName = \"beta\"; payload = \"x\"; }\n",
    );
    let reports = env.publish_json();
    assert_eq!(
        statuses(&reports),
        pairs(&[
            ("alpha", "unchanged"),
            ("beta", "published"),
            ("classic1", "unchanged"),
            ("lonely", "unchanged")
        ])
    );
}

#[test]
fn a_file_only_one_flake_host_imports_gives_only_that_host_a_new_version() {
    let env = Env::new();
    env.publish_json();
    let alpha_before = env.manifest("alpha");
    let beta_before = env.manifest("beta");

    env.fleet.write(
        "hosts/multi/machines/beta.nix",
        "{ hostName = \"beta\"; payload = \"only beta\"; }\n",
    );
    // `--dry-run` decides as publish does (alpha: same system) and writes nothing.
    let before = tree_fingerprint(&env.chroot());
    let (code, stdout, stderr) = run_publish(&env, &["--dry-run"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        line_of(&stdout, "alpha").contains("unchanged (same system)"),
        "{stdout}"
    );
    assert!(
        line_of(&stdout, "beta").contains("new version (configuration changed)"),
        "{stdout}"
    );
    let (code, stdout, stderr) = run_publish(&env, &["--dry-run", "--json"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let doc: Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(doc["hosts"][0]["host"], "alpha", "{doc}");
    assert_eq!(doc["hosts"][0]["new_version"], false, "{doc}");
    assert_eq!(doc["hosts"][0]["reason"], "same system", "{doc}");
    assert_eq!(doc["hosts"][1]["new_version"], true, "{doc}");
    assert_eq!(
        doc["hosts"][1]["changes"]["config"][0]["path"], "machines/beta.nix",
        "{doc}"
    );
    assert_eq!(tree_fingerprint(&env.chroot()), before, "--dry-run wrote");
    assert_eq!(env.manifest("beta").digest(), beta_before.digest());
    let (code, stdout, stderr) = run_publish(&env, &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        line_of(&stdout, "alpha").contains("unchanged (same system)"),
        "{stdout}"
    );
    assert!(line_of(&stdout, "beta").contains("published"), "{stdout}");
    // alpha's live version is untouched: same manifest, same serial.
    assert_eq!(env.manifest("alpha").digest(), alpha_before.digest());
    let beta = env.manifest("beta");
    assert_eq!(beta.serial, beta_before.serial + 1);

    // Another change for beta: `--json` gives alpha's reason; a host whose tree did not
    // change at all has none.
    env.fleet.write(
        "hosts/multi/machines/beta.nix",
        "{ hostName = \"beta\"; payload = \"beta again\"; }\n",
    );
    let reports = env.publish_json();
    assert_eq!(
        statuses(&reports),
        pairs(&[
            ("alpha", "unchanged"),
            ("beta", "published"),
            ("classic1", "unchanged")
        ])
    );
    assert_eq!(reports[0]["reason"], "same system", "{}", reports[0]);
    assert!(reports[2].get("reason").is_none(), "{}", reports[2]);
    assert_eq!(env.manifest("alpha").digest(), alpha_before.digest());

    // A change to what alpha runs still publishes it.
    env.fleet.write(
        "hosts/multi/machines/alpha.nix",
        "{ hostName = \"alpha\"; payload = \"now alpha\"; }\n",
    );
    let reports = env.publish_json();
    assert_eq!(reports[0]["status"], "published", "{}", reports[0]);
    assert_eq!(reports[1]["status"], "unchanged", "{}", reports[1]);
    assert_eq!(reports[1]["reason"], "same system", "{}", reports[1]);
    assert_eq!(env.manifest("alpha").serial, alpha_before.serial + 1);
}

#[test]
fn old_versions_are_collected_after_three() {
    let env = Env::new();
    let mut digests = Vec::new();
    for v in 0..5 {
        env.fleet
            .write("hosts/classic1/extra.nix", &format!("# version {v}\n"));
        env.publish(&["--host", "classic1"]).success();
        let dir = env.chroot().join("classic1");
        digests.push(
            bento::protocol::layout::parse_current(
                &fs::read_to_string(dir.join("current")).unwrap(),
            )
            .unwrap(),
        );
        // Distinct creation times order the versions.
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let dir = env.chroot().join("classic1");
    let mut kept: Vec<String> = fs::read_dir(dir.join("manifests"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        // Not `.spare.json`: the manifest last pushed out, kept for the next one to be
        // written into (docs/protocol.md).
        .filter(|n| !n.starts_with(".spare."))
        .collect();
    kept.sort();
    let mut want: Vec<String> = digests[2..].iter().map(|d| format!("{d}.json")).collect();
    want.sort();
    assert_eq!(kept, want);
    // Objects: exactly those the kept manifests use.
    let mut used = std::collections::BTreeSet::new();
    for d in &digests[2..] {
        let m = Manifest::parse(&fs::read(bento::protocol::layout::manifest(&dir, d)).unwrap())
            .unwrap();
        used.extend(m.objects().into_iter().map(|o| o.to_hex()));
    }
    let objects: std::collections::BTreeSet<String> = fs::read_dir(dir.join("objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(objects, used);
    // The pool holds nothing that no host uses.
    for e in fs::read_dir(env.chroot().join(".bento/pool")).unwrap() {
        assert!(e.unwrap().metadata().unwrap().nlink() > 1);
    }
}

/// What a format-2 version in `dir` uses, walked from its trees on disk.
fn uses_on_disk(dir: &std::path::Path, digest: &bento::protocol::manifest::Digest) -> Vec<String> {
    let mut m = Manifest::parse(&fs::read(bento::protocol::layout::manifest(dir, digest)).unwrap())
        .unwrap();
    let fetch = |d: &bento::protocol::manifest::Digest| {
        Ok::<_, bento::protocol::tree::TreeError>(
            fs::read(dir.join("objects").join(d.to_hex())).unwrap(),
        )
    };
    m.expand(fetch).unwrap();
    m.objects().into_iter().map(|o| o.to_hex()).collect()
}

#[test]
fn format_2_collection_keeps_exactly_what_the_kept_versions_use_whatever_the_caches_say() {
    let env = Env::new();
    let toml = env.fleet.path("bento.toml");
    let text = fs::read_to_string(&toml).unwrap();
    fs::write(
        &toml,
        text.replacen("[server]\n", "[server]\nformat = 2\n", 1),
    )
    .unwrap();
    let dir = env.chroot().join("classic1");
    let edges = env.chroot().join(".bento/tree-edges");
    // What the publisher remembers of the kept versions (serial, time, root), so numbering
    // and collecting read no kept manifest back.
    let versions = env.chroot().join(".bento/versions");
    let mut digests = Vec::new();
    // Five publishes of classic1 alone (every edge kept), then the whole fleet's (edges of
    // versions no longer live dropped), then classic1's again.
    for v in 0..8 {
        // Host-own and shared files change in turn: new root trees, then new shared ones.
        match v % 2 {
            0 => env
                .fleet
                .write("hosts/classic1/extra.nix", &format!("# version {v}\n")),
            _ => env
                .fleet
                .write("common/base.nix", &format!("{{ version = \"b{v}\"; }}\n")),
        }
        // The cache of what trees point at lost, then broken; the memo of kept versions
        // kept while the edges are lost (its roots then unknown), then lost, then torn:
        // collection and numbering are the same.
        match v {
            3 => fs::remove_file(&edges).unwrap(),
            4 => fs::write(&edges, b"bento tree edges 1\nnot a record").unwrap(),
            5 => fs::remove_file(&versions).unwrap(),
            7 => {
                let bytes = fs::read(&versions).unwrap();
                fs::write(&versions, &bytes[..bytes.len() - 1]).unwrap();
            }
            _ => {}
        }
        match v {
            6 => env.publish(&[]).success(),
            _ => env.publish(&["--host", "classic1"]).success(),
        };
        assert!(edges.exists(), "publish {v} saves the edges");
        assert!(versions.exists(), "publish {v} saves the kept versions");
        digests.push(
            bento::protocol::layout::parse_current(
                &fs::read_to_string(dir.join("current")).unwrap(),
            )
            .unwrap(),
        );
        // Numbered above every kept version, each publish a new serial.
        let live = Manifest::parse(
            &fs::read(bento::protocol::layout::manifest(
                &dir,
                digests.last().unwrap(),
            ))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(live.serial, v + 1, "after publish {v}");
        // Kept: the last three; objects: exactly what they use.
        let kept = &digests[digests.len().saturating_sub(3)..];
        let mut manifests: Vec<String> = fs::read_dir(dir.join("manifests"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            // Not `.spare.json`: the manifest last pushed out, kept for the next one to be
            // written into (docs/protocol.md).
            .filter(|n| n.ends_with(".json") && !n.starts_with(".spare."))
            .collect();
        manifests.sort();
        let mut want: Vec<String> = kept.iter().map(|d| format!("{d}.json")).collect();
        want.sort();
        assert_eq!(manifests, want, "after publish {v}");
        let used: std::collections::BTreeSet<String> =
            kept.iter().flat_map(|d| uses_on_disk(&dir, d)).collect();
        let objects: std::collections::BTreeSet<String> = fs::read_dir(dir.join("objects"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(objects, used, "after publish {v}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for e in fs::read_dir(env.chroot().join(".bento/pool")).unwrap() {
        assert!(
            e.unwrap().metadata().unwrap().nlink() > 1,
            "the pool keeps only used objects"
        );
    }
}

#[test]
fn a_host_without_account_fails_alone() {
    let env = Env::new();
    env.fleet.write(
        "hosts/orphan/configuration.nix",
        "{ ... }: { hostName = \"orphan\"; }\n",
    );
    let out = env.publish(&[]).failure().get_output().stdout.clone();
    let text = String::from_utf8_lossy(&out);
    let orphan = text
        .lines()
        .find(|l| l.starts_with("orphan"))
        .expect("a line for orphan");
    assert!(orphan.contains("failed"), "{orphan}");
    assert!(
        orphan.contains(&format!("{}orphan", env.prefix)),
        "{orphan}"
    );
    assert!(orphan.contains("sync-accounts"), "{orphan}");
    // sync-accounts makes accounts for [hosts.NAME] only: the line says to add one.
    assert!(
        orphan.contains("no [hosts.orphan]") && orphan.contains("add [hosts.orphan]"),
        "{orphan}"
    );
    for h in HOSTS {
        assert!(
            verify_host(&env.chroot().join(h), &HostName::new(h).unwrap())
                .unwrap()
                .is_some()
        );
    }
    assert!(!env.chroot().join("orphan").exists());
}

/// Each bad input is refused with a message naming the culprit, and the chroot is left
/// exactly as it was.
#[test]
fn bad_input_is_refused_by_name_and_changes_nothing() {
    let env = Env::new();
    env.publish_json();
    let before = chroot_fingerprint(&env.chroot());

    type Setup = fn(&FixtureFleet);
    let cases: Vec<(&str, Setup, Setup, &str)> = vec![
        (
            "dangling link",
            |f| f.link("../../common/nope.nix", "hosts/classic1/nope.nix"),
            |f| fs::remove_file(f.path("hosts/classic1/nope.nix")).unwrap(),
            "hosts/classic1/nope.nix",
        ),
        (
            "link out of the repo",
            |f| {
                f.write("../outside", "not part of the fleet");
                f.link("../../../outside", "hosts/classic1/out")
            },
            |f| fs::remove_file(f.path("hosts/classic1/out")).unwrap(),
            "outside the fleet repo",
        ),
        (
            "link loop",
            |f| f.link("..", "hosts/classic1/up"),
            |f| fs::remove_file(f.path("hosts/classic1/up")).unwrap(),
            "hosts/classic1/up",
        ),
        (
            "bad host directory name",
            |f| f.write("hosts/Bad_Host/configuration.nix", "{}"),
            |f| fs::remove_dir_all(f.path("hosts/Bad_Host")).unwrap(),
            "Bad_Host",
        ),
        (
            "two hosts of one name",
            |f| f.write("hosts/alpha/configuration.nix", "{}"),
            |f| fs::remove_dir_all(f.path("hosts/alpha")).unwrap(),
            "host alpha is defined twice: by hosts/alpha and by hosts/multi/flake.nix",
        ),
        (
            "malformed bento.toml",
            |f| {
                let t = fs::read_to_string(f.path("bento.toml")).unwrap();
                f.write("bento.toml.orig", &t);
                f.write("bento.toml", &format!("{t}[hosts.alpha\n"));
            },
            |f| fs::rename(f.path("bento.toml.orig"), f.path("bento.toml")).unwrap(),
            "line 7",
        ),
        (
            "files.toml naming no file",
            |f| {
                f.write(
                    "hosts/classic1/files.toml",
                    "[\"etc/missing\"]\nmode = \"0600\"\n",
                )
            },
            |f| {
                f.write(
                    "hosts/classic1/files.toml",
                    "[\"etc/bento-test/secret\"]\nmode = \"0640\"\ngroup = \"root\"\n",
                )
            },
            "etc/missing",
        ),
        (
            "a FIFO in a host",
            |f| {
                let c = std::ffi::CString::new(
                    f.path("hosts/classic1/pipe")
                        .into_os_string()
                        .into_encoded_bytes(),
                )
                .unwrap();
                // SAFETY: a valid path string.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            },
            |f| fs::remove_file(f.path("hosts/classic1/pipe")).unwrap(),
            "hosts/classic1/pipe",
        ),
        (
            "a hard link to a file outside the repo",
            |f| {
                f.write("../outside-secret", "root's secret");
                fs::hard_link(
                    f.path("../outside-secret"),
                    f.path("hosts/classic1/innocent.nix"),
                )
                .unwrap();
            },
            |f| fs::remove_file(f.path("hosts/classic1/innocent.nix")).unwrap(),
            "hosts/classic1/innocent.nix: has 2 hard links",
        ),
        (
            "an enormous file",
            |f| {
                let file = fs::File::create(f.path("hosts/classic1/huge.iso")).unwrap();
                file.set_len(bento::protocol::manifest::MAX_OBJECT_BYTES + 1)
                    .unwrap();
            },
            |f| fs::remove_file(f.path("hosts/classic1/huge.iso")).unwrap(),
            "hosts/classic1/huge.iso: is 1073741825 bytes",
        ),
        (
            "a file name that is not UTF-8",
            |f| {
                use std::os::unix::ffi::OsStrExt;
                let name = std::ffi::OsStr::from_bytes(b"bad-\xff.nix");
                fs::write(f.path("hosts/classic1").join(name), "x").unwrap();
            },
            |f| {
                use std::os::unix::ffi::OsStrExt;
                fs::remove_file(
                    f.path("hosts/classic1")
                        .join(std::ffi::OsStr::from_bytes(b"bad-\xff.nix")),
                )
                .unwrap()
            },
            "not valid UTF-8",
        ),
    ];
    for (what, break_it, fix_it, needle) in cases {
        // Make the change noticeable if the refusal were to let a publish through.
        env.fleet
            .write("hosts/classic1/extra.nix", &format!("# {what}\n"));
        break_it(&env.fleet);
        let out = env.publish(&[]).failure().get_output().clone();
        // Issue #24 item 8: a host whose directory cannot be read fails alone, in the
        // summary (stdout); anything else stops the run (stderr).
        let err = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            err.contains(needle),
            "{what}: expected {needle:?} in: {err}"
        );
        assert_eq!(
            chroot_fingerprint(&env.chroot()),
            before,
            "{what}: chroot changed"
        );
        fix_it(&env.fleet);
        fs::remove_file(env.fleet.path("hosts/classic1/extra.nix")).unwrap();
    }
    // And with everything fixed, nothing is pending.
    let reports = env.publish_json();
    assert!(
        reports.iter().all(|r| r["status"] == "unchanged"),
        "{reports:?}"
    );

    let out = env
        .publish(&["--host", "nosuch"])
        .failure()
        .get_output()
        .stderr
        .clone();
    assert!(String::from_utf8_lossy(&out).contains("no host named nosuch"));
}

#[test]
fn result_links_git_and_droppings_are_not_published() {
    let env = Env::new();
    env.fleet.link(
        "/nix/store/00000000000000000000000000000000-x",
        "hosts/classic1/result",
    );
    env.fleet.write("hosts/classic1/configuration.nix~", "old");
    env.fleet.write("hosts/classic1/.git/HEAD", "ref");
    env.publish_json();
    let m = env.manifest("classic1");
    let names: Vec<&str> = m.config.iter().map(|e| e.path().as_str()).collect();
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("result") || n.ends_with('~') || n.starts_with(".git")),
        "{names:?}"
    );
}

/// Publish is killed at many moments; whatever `current` names must always be complete and
/// hash-correct, and the next publish completes.
#[test]
fn killed_publish_never_exposes_an_incomplete_version() {
    use rand::{Rng, SeedableRng};
    let env = Env::new();
    // Enough files that a publish takes a while.
    for i in 0..150 {
        env.fleet.write(
            &format!("hosts/classic1/many/f{i}.nix"),
            &format!("# {i}\n{}\n", "x".repeat(2000)),
        );
    }
    env.publish_json();
    let t0 = std::time::Instant::now();
    env.fleet.write("hosts/classic1/many/timing.nix", "# t\n");
    env.publish_json();
    let full = t0.elapsed();

    let mut rng = rand::rngs::StdRng::seed_from_u64(20261125);
    let rounds = 40;
    let mut interrupted = 0;
    for round in 0..rounds {
        // Change every file so each run has real work to do.
        for i in 0..150 {
            env.fleet.write(
                &format!("hosts/classic1/many/f{i}.nix"),
                &format!("# {i} round {round}\n"),
            );
        }
        env.fleet.write(
            "common/base.nix",
            &format!("{{ version = \"r{round}\"; }}\n"),
        );
        let mut child = crate::common::bento_std()
            .arg("--fleet")
            .arg(&env.fleet.root)
            .arg("publish")
            .arg("--chroot")
            .arg(env.chroot())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let delay = full.mul_f64(rng.gen_range(0.0..1.2));
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            interrupted += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        for h in HOSTS {
            let dir = env.chroot().join(h);
            verify_host(&dir, &HostName::new(h).unwrap())
                .unwrap_or_else(|e| panic!("round {round}, {h}: live version broken: {e}"));
        }
    }
    assert!(
        interrupted >= rounds / 4,
        "only {interrupted} of {rounds} runs were cut short"
    );
    // After all that, a normal publish completes and leaves no temporary files behind.
    env.publish(&[]).success();
    let mut leftovers = Vec::new();
    for h in HOSTS {
        for sub in ["", "manifests"] {
            for e in fs::read_dir(env.chroot().join(h).join(sub)).unwrap() {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                if n.starts_with(bento::sys::atomic::TMP_PREFIX) {
                    leftovers.push(n);
                }
            }
        }
    }
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(fs::read_dir(env.chroot().join(".bento/tmp"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn a_chroot_below_a_writable_directory_is_refused_before_writing() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let open = env.scratch.join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o775)).unwrap();
    let chroot = open.join("chroot");
    let out = bento()
        .arg("--fleet")
        .arg(&env.fleet.root)
        .arg("publish")
        .arg("--chroot")
        .arg(&chroot)
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    let err = String::from_utf8_lossy(&out);
    assert!(
        err.contains(&format!("chroot path {}", open.display())),
        "{err}"
    );
    assert!(err.contains("group-writable"), "{err}");
    assert!(!chroot.exists(), "nothing written");
}

/// A private key in a host's configuration tree would land in the world-readable Nix store:
/// that host is refused, naming the file and `files/`; the others still publish; the key
/// under `files/` is fine.
#[test]
fn a_private_key_in_the_configuration_tree_is_refused() {
    let env = Env::new();
    let key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ==\n-----END OPENSSH PRIVATE KEY-----\n";
    env.fleet.write("hosts/classic1/keys/id_ed25519", key);
    let publish = || {
        let out = env.publish(&[]).failure().get_output().clone();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let line = |text: &str, host: &str| {
        text.lines()
            .find(|l| l.starts_with(host))
            .unwrap_or_else(|| panic!("no line for {host}:\n{text}"))
            .to_owned()
    };
    let published = |h: &str| {
        verify_host(&env.chroot().join(h), &HostName::new(h).unwrap())
            .unwrap()
            .is_some()
    };
    let text = publish();
    let classic1 = line(&text, "classic1");
    assert!(classic1.contains("failed"), "{classic1}");
    assert!(
        classic1.contains("hosts/classic1/keys/id_ed25519"),
        "{classic1}"
    );
    assert!(classic1.contains("private key"), "{classic1}");
    assert!(classic1.contains("move it under files/"), "{classic1}");
    assert!(!published("classic1"));
    assert!(published("alpha") && published("beta"), "{text}");

    // Moved under files/, it publishes; an age identity pasted into a module of the shared
    // flake directory refuses both of its hosts.
    fs::remove_dir_all(env.fleet.path("hosts/classic1/keys")).unwrap();
    env.fleet
        .write("hosts/classic1/files/etc/ssh/ssh_host_ed25519_key", key);
    env.fleet.write(
        "hosts/multi/machines/beta.nix",
        "{ hostName = \"beta\"; age = \"AGE-SECRET-KEY-1QYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQ\"; }\n",
    );
    let text = publish();
    assert!(line(&text, "classic1").contains("published"), "{text}");
    for h in ["alpha", "beta"] {
        let l = line(&text, h);
        assert!(
            l.contains("failed") && l.contains("hosts/multi/machines/beta.nix"),
            "{l}"
        );
    }
    let m = env.manifest("classic1");
    assert!(m
        .files
        .iter()
        .any(|f| f.target.as_str() == "/etc/ssh/ssh_host_ed25519_key"));
}

/// (exit code, stdout, stderr) of `bento publish ARGS`.
fn run_publish(env: &Env, extra: &[&str]) -> (i32, String, String) {
    let out = env.publish(extra).get_output().clone();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn line_of<'a>(stdout: &'a str, host: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(host))
        .unwrap_or_else(|| panic!("no line for {host} in:\n{stdout}"))
}

#[test]
fn a_flake_directory_that_does_not_evaluate_fails_alone() {
    let env = Env::new();
    env.publish_json();
    // A syntax error in the flake that defines alpha and beta, and a change for classic1.
    let flake = fs::read_to_string(env.fleet.path("hosts/multi/flake.nix")).unwrap();
    env.fleet
        .write("hosts/multi/flake.nix", &format!("{flake}}}\n"));
    env.fleet.write("hosts/classic1/extra.nix", "# a change\n");
    let (code, stdout, stderr) = run_publish(&env, &[]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(
        line_of(&stdout, "classic1").contains("published"),
        "{stdout}"
    );
    for h in ["alpha", "beta"] {
        let l = line_of(&stdout, h);
        assert!(l.contains("failed") && l.contains("hosts/multi"), "{l}");
    }
    // Nix's error once, naming the fleet repo's file, never its store or scratch copy.
    let all = format!("{stdout}{stderr}");
    assert_eq!(all.matches("syntax error").count(), 1, "{all}");
    assert!(all.contains("hosts/multi/flake.nix:"), "{all}");
    assert!(
        !all.contains("/nix/store/") && !all.contains("bento-eval-"),
        "{all}"
    );

    // Naming another host: it is published and the run succeeds; the flake is a warning.
    env.fleet
        .write("hosts/classic1/extra.nix", "# another change\n");
    let (code, stdout, stderr) = run_publish(&env, &["--host", "classic1"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        line_of(&stdout, "classic1").contains("published"),
        "{stdout}"
    );
    assert!(
        stderr.contains("warning: hosts/multi") && stderr.matches("syntax error").count() == 1,
        "{stderr}"
    );
    // With --build too: the build names the flake once, the other host is built and published.
    env.fleet
        .write("hosts/classic1/extra.nix", "# a third change\n");
    let (code, stdout, stderr) = run_publish(&env, &["--build"]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(
        line_of(&stdout, "classic1").contains("published"),
        "{stdout}"
    );
    for h in ["alpha", "beta"] {
        assert!(line_of(&stdout, h).contains("failed"), "{stdout}");
    }
    let all = format!("{stdout}{stderr}");
    assert_eq!(all.matches("syntax error").count(), 1, "{all}");
    assert!(env.manifest("classic1").system.is_some());
    // The live versions of the flake's hosts are untouched.
    for h in ["alpha", "beta"] {
        assert!(
            verify_host(&env.chroot().join(h), &HostName::new(h).unwrap())
                .unwrap()
                .is_some()
        );
    }
}

#[test]
fn a_host_table_without_a_directory_fails_alone() {
    let env = Env::new();
    let toml = fs::read_to_string(env.fleet.path("bento.toml")).unwrap();
    env.fleet
        .write("bento.toml", &format!("{toml}[hosts.ghost]\n"));
    let out = env.publish(&["--json"]).code(1).get_output().clone();
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        statuses(&reports),
        pairs(&[
            ("alpha", "published"),
            ("beta", "published"),
            ("classic1", "published"),
            ("ghost", "failed"),
        ])
    );
    let ghost = reports.iter().find(|r| r["host"] == "ghost").unwrap();
    let error = ghost["error"].as_str().unwrap();
    assert!(
        error.contains("[hosts.ghost]") && error.contains("hosts/ghost/configuration.nix"),
        "{error}"
    );
    // Once, in the report: not again on stderr.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("[hosts.ghost]"), "{stderr}");
    // Another host alone is fine; the ghost alone fails by name.
    env.publish(&["--host", "alpha"]).success();
    let (code, stdout, _) = run_publish(&env, &["--host", "ghost"]);
    assert_eq!(code, 1);
    assert!(line_of(&stdout, "ghost").contains("failed"), "{stdout}");
}

#[test]
fn a_dirty_work_tree_is_recorded_and_warned_about() {
    let env = Env::new();
    let git = |args: &[&str]| {
        let st = std::process::Command::new("git")
            .arg("-C")
            .arg(&env.fleet.root)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.org"])
            .args(args)
            .output()
            .unwrap();
        assert!(st.status.success(), "git {args:?}: {st:?}");
        String::from_utf8_lossy(&st.stdout).trim().to_owned()
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-qm", "fleet"]);
    let head = git(&["rev-parse", "HEAD"]);
    let reports = env.publish_json();
    assert!(reports
        .iter()
        .all(|r| r["warnings"] == serde_json::json!([])));
    let m = env.manifest("classic1");
    assert_eq!(m.source_commit.as_deref(), Some(head.as_str()));
    assert!(!m.dirty);
    let bytes = fs::read_to_string(bento::protocol::layout::manifest(
        &env.chroot().join("classic1"),
        &m.digest(),
    ))
    .unwrap();
    assert!(
        !bytes.contains("dirty"),
        "a clean manifest has no dirty field"
    );

    env.fleet
        .write("hosts/classic1/extra.nix", "# not committed\n");
    let out = env.publish(&["--json"]).success().get_output().clone();
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let classic = reports.iter().find(|r| r["host"] == "classic1").unwrap();
    assert_eq!(classic["status"], "published");
    let warnings = classic["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("uncommitted changes")),
        "{warnings:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("uncommitted changes").count(), 1, "{stderr}");
    let m = env.manifest("classic1");
    assert!(m.dirty);
    assert_eq!(m.source_commit.as_deref(), Some(head.as_str()));

    // Committing the same content is no new version: the dirty flag is not content.
    git(&["add", "-A"]);
    git(&["commit", "-qm", "extra"]);
    let reports = env.publish_json();
    assert!(
        reports.iter().all(|r| r["status"] == "unchanged"),
        "{reports:?}"
    );
}

#[test]
fn silent_mistakes_are_warned_about() {
    let env = Env::new();
    // A file under the flake's files/ that belongs to no host it defines, one directly
    // under files/, and an input without a flake.lock.
    env.fleet.write("hosts/multi/files/gamma/etc/x", "x\n");
    env.fleet.write("hosts/multi/files/loose", "x\n");
    env.fleet.write("hosts/multi/files/alpha/etc/ok", "ok\n");
    let dep = env.scratch.join("dep");
    fs::create_dir_all(&dep).unwrap();
    fs::write(dep.join("flake.nix"), "{ outputs = _: { }; }\n").unwrap();
    let flake = fs::read_to_string(env.fleet.path("hosts/multi/flake.nix")).unwrap();
    env.fleet.write(
        "hosts/multi/flake.nix",
        &flake.replacen(
            "outputs = { self }:",
            &format!(
                "inputs.dep.url = \"path:{}\";\n  outputs = {{ self, dep }}:",
                dep.display()
            ),
            1,
        ),
    );
    let out = env.publish(&["--json"]).success().get_output().clone();
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let warnings = |h: &str| -> Vec<String> {
        reports.iter().find(|r| r["host"] == h).unwrap()["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap().to_owned())
            .collect()
    };
    for h in ["alpha", "beta"] {
        let w = warnings(h);
        assert!(
            w.iter().any(|w| w.contains("hosts/multi/files/gamma")
                && w.contains("hosts/multi/files/loose")
                && w.contains("files/<host>/")
                && !w.contains("files/alpha")),
            "{h}: {w:?}"
        );
        assert!(
            w.iter()
                .any(|w| w.contains("no flake.lock") && w.contains("bento flake-update")),
            "{h}: {w:?}"
        );
    }
    assert!(warnings("classic1").is_empty());
    // On stderr once each, though two hosts share them.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("no flake.lock").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("files/gamma").count(), 1, "{stderr}");
    // alpha's own file is installed, the stray ones are not.
    let alpha = env.manifest("alpha");
    let targets: Vec<&str> = alpha.files.iter().map(|f| f.target.as_str()).collect();
    assert_eq!(targets, ["/etc/ok"]);
}
