//! What hosts get over an object store beyond a plain update, each test over SeaweedFS
//! configured from `bento server s3-policy --engine seaweedfs`, the real agent holding only
//! its host's printed rights: a `build_on = "server"` host running the closure the server
//! exported to `cache/` (and refusing a narinfo signed by another key or an altered NAR in
//! the bucket), secrets sealed to the host's SSH key installed as plaintext while the bucket
//! holds none (an object altered in the bucket refused), and `bento rollout --trigger --wait-timeout` going wave by wave through the
//! store. The SFTP versions of these are in substitute.rs, secrets.rs and rollout.rs.

use std::fs;
use std::path::Path;
use std::process::Command;

use bento::protocol::manifest::Manifest;
use bento::protocol::narinfo::{self, NarInfo};
use bento::protocol::report::{Outcome, Report};
use bento::sys::s3::{Client, PutMode};

use crate::agent::{code, fleet, text, write_version, Machine, EXIT_FAILED, EXIT_UPDATED};
use crate::common::sshd::Sshd;
use crate::common::NIX_CONFIG;
use crate::delivery::cache_key;
use crate::rollout::{configure, trigger_command};
use crate::s3_publish::{ok, read, run, OnSeaweed};
use crate::secrets::{append_toml, keypair};
use crate::substitute::{assert_nothing_evaluated, closure, delete, no_builds, Bed};

const BUCKET: &str = "fleet";

/// The fleet of `sshd` pointed at a fresh SeaweedFS configured from the printed policy.
struct OnStore {
    store: OnSeaweed,
    admin: Client,
}

impl OnStore {
    fn new(sshd: &Sshd) -> Self {
        let store = OnSeaweed::start(&sshd.fleet());
        OnStore {
            admin: store.engine.admin_client(),
            store,
        }
    }

    /// `host`'s agent over the store with only its printed rights, and `extra` settings.
    fn machine<'a>(&self, sshd: &'a Sshd, host: &str, extra: &str) -> Machine<'a> {
        let m = Machine::new(sshd, host, "");
        self.configure(&m, extra);
        m
    }

    fn configure(&self, m: &Machine<'_>, extra: &str) {
        self.store.agent(m, &self.store.engine.endpoint, extra);
    }

    fn live_manifest(&self, host: &str) -> Manifest {
        let current = read(&self.admin, &format!("hosts/{host}/current")).expect("current");
        let digest = String::from_utf8(current).unwrap();
        let bytes = read(
            &self.admin,
            &format!("hosts/{host}/manifests/{}.json", digest.trim()),
        )
        .expect("the live manifest");
        Manifest::parse(&bytes).unwrap()
    }

    fn latest(&self, host: &str) -> Report {
        Report::parse(&read(&self.admin, &format!("hosts/{host}/logs/latest.json")).unwrap())
            .unwrap()
    }
}

/// What a user relies on with `build_on = "server"` over an object store: the host runs the
/// system the server built and exported to its `cache/` without evaluating or building, and
/// a narinfo signed by a key it does not trust or a NAR altered in the bucket is refused
/// before anything on the machine changes.
#[test]
fn s3_server_built_host_updates_from_cache_and_refuses_a_tampered_narinfo_and_nar() {
    let bed = Bed::new(1);
    let f = bed.sshd.fleet();
    let store = OnStore::new(&bed.sshd);
    ok(run(&f, &["publish"]));
    let system = store.live_manifest("alpha").system.expect("a system");
    let paths = closure(system.as_str());
    delete(&paths);
    let cache_keys = format!("cache_keys = [\"{}\"]\n", bed.public);
    let m = store.machine(&bed.sshd, "alpha", &cache_keys);
    let out = m.update_with(&[("NIX_CONFIG", &no_builds())], &[]);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert_nothing_evaluated(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(m.profile_target().as_deref(), Some(system.as_str()));
    assert_eq!(store.latest("alpha").outcome, Outcome::Success);

    // Version 2 changes the toplevel; its narinfo and NAR are what the bucket alters.
    fs::write(f.join("hosts/alpha/version.nix"), "{ version = \"2\"; }\n").unwrap();
    ok(run(&f, &["publish"]));
    let system2 = store.live_manifest("alpha").system.expect("a system");
    assert_ne!(system2, system);
    // The same path exported with another cache key: validly signed, not trusted.
    let other_keys = bed.secret.parent().unwrap().join("s3-other-key");
    fs::create_dir_all(&other_keys).unwrap();
    let (other_secret, _) = cache_key(&other_keys);
    let other = bed.secret.parent().unwrap().join("s3-other-cache");
    let out = Command::new("nix")
        .args(["copy", "--to"])
        .arg(format!(
            "file://{}?compression=zstd&secret-key={}",
            other.display(),
            other_secret.display()
        ))
        .arg(system2.as_str())
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    delete(&[system2.to_string()]);
    let unchanged = |m: &Machine<'_>| {
        assert_eq!(m.profile_target().as_deref(), Some(system.as_str()));
        assert_eq!(m.activations().len(), 1, "something was activated");
        assert!(
            !Path::new(system2.as_str()).exists(),
            "{system2} entered the store"
        );
    };

    let info_key = format!(
        "hosts/alpha/cache/{}.narinfo",
        narinfo::hash_part(system2.as_str())
    );
    let original = read(&store.admin, &info_key).expect("the narinfo in the bucket");
    let foreign =
        fs::read(other.join(format!("{}.narinfo", narinfo::hash_part(system2.as_str())))).unwrap();
    store
        .admin
        .put(BUCKET, &info_key, &foreign, PutMode::Overwrite)
        .unwrap();
    let out = m.update_with(&[("NIX_CONFIG", &no_builds())], &["--force"]);
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let error = store.latest("alpha").error.unwrap_or_default();
    assert!(
        error.contains(system2.as_str()) && error.contains("no signature by a trusted cache key"),
        "{error}"
    );
    unchanged(&m);
    store
        .admin
        .put(BUCKET, &info_key, &original, PutMode::Overwrite)
        .unwrap();

    let info = NarInfo::parse(&String::from_utf8(original).unwrap()).unwrap();
    let nar_key = format!("hosts/alpha/cache/{}", info.url);
    let good_nar = read(&store.admin, &nar_key).expect("the NAR in the bucket");
    let mut bad = good_nar.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    store
        .admin
        .put(BUCKET, &nar_key, &bad, PutMode::Overwrite)
        .unwrap();
    let out = m.update_with(&[("NIX_CONFIG", &no_builds())], &["--force"]);
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let error = store.latest("alpha").error.unwrap_or_default();
    assert!(
        error.contains(system2.as_str()) && error.contains("the narinfo says sha256:"),
        "{error}"
    );
    unchanged(&m);

    // Put right, the same version goes through.
    store
        .admin
        .put(BUCKET, &nar_key, &good_nar, PutMode::Overwrite)
        .unwrap();
    let out = m.update_with(&[("NIX_CONFIG", &no_builds())], &["--force"]);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert_eq!(m.profile_target().as_deref(), Some(system2.as_str()));
}

/// What a user relies on with `[secrets] encrypt` over an object store: the bucket (and
/// whoever reads it) holds no secret in plaintext, the host, decrypting with its SSH key,
/// installs it with its configured mode, and ciphertext altered in the bucket is refused
/// with the installed secret left as it was.
#[test]
fn s3_secrets_sealed_to_the_host_are_installed_and_never_stored_in_plaintext() {
    let sshd = Sshd::start(&["alpha"]);
    let (_, admin_pub) = keypair(&sshd.dir.path, "admin");
    fleet(&sshd);
    append_toml(
        &sshd,
        &format!("\n[secrets]\nencrypt = true\nrecipients = [\"{admin_pub}\"]\n"),
    );
    let marker = format!("S3-MARKER-{}\n", sshd.prefix);
    fs::write(
        sshd.fleet()
            .join("hosts/alpha/files/alpha/etc/bento-it/secret"),
        &marker,
    )
    .unwrap();
    let store = OnStore::new(&sshd);
    ok(run(&sshd.fleet(), &["publish", "--no-eval"]));

    let entry = store
        .live_manifest("alpha")
        .files
        .into_iter()
        .find(|e| e.target.as_str() == "/etc/bento-it/secret")
        .expect("the secret's entry");
    assert!(
        serde_json::to_value(&entry).unwrap()["encrypted"] == "age",
        "{entry:?}"
    );
    let keys = store.admin.list(BUCKET, "hosts/").unwrap();
    assert!(!keys.is_empty());
    for listed in &keys {
        let bytes = read(&store.admin, &listed.key).unwrap();
        assert!(
            !bytes
                .windows(marker.trim().len())
                .any(|w| w == marker.trim().as_bytes()),
            "plaintext secret in {}",
            listed.key
        );
    }

    let key = sshd.client_key("alpha");
    let m = store.machine(
        &sshd,
        "alpha",
        &format!("identity_file = \"{}\"\n", key.display()),
    );
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let installed = m.base.join("root/etc/bento-it/secret");
    assert_eq!(fs::read_to_string(&installed).unwrap(), marker);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(&installed).unwrap().mode() & 0o7777, 0o640);

    // A new secret whose ciphertext is altered in the bucket: refused, the old plaintext
    // stays, the failure is reported.
    fs::write(
        sshd.fleet()
            .join("hosts/alpha/files/alpha/etc/bento-it/secret"),
        format!("S3-MARKER-2-{}\n", sshd.prefix),
    )
    .unwrap();
    ok(run(&sshd.fleet(), &["publish", "--no-eval"]));
    let entry = store
        .live_manifest("alpha")
        .files
        .into_iter()
        .find(|e| e.target.as_str() == "/etc/bento-it/secret")
        .unwrap();
    let object = format!("hosts/alpha/objects/{}", entry.sha256);
    let mut bytes = read(&store.admin, &object).expect("the ciphertext");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    store
        .admin
        .put(BUCKET, &object, &bytes, PutMode::Overwrite)
        .unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    assert_eq!(fs::read_to_string(&installed).unwrap(), marker);
    let failed = store.latest("alpha");
    assert_eq!(failed.outcome, Outcome::Failure);
    assert!(
        failed.error.as_deref().unwrap_or("").contains("hashes to"),
        "{failed:?}"
    );
}

/// What a user relies on with `bento rollout` over an object store: it publishes wave by
/// wave through the store, triggers each wave's hosts and, with `--wait-timeout`, waits for
/// their reports (read from the store) before the next wave and at the end.
#[test]
fn s3_rollout_with_trigger_and_wait_goes_wave_by_wave_through_the_store() {
    let sshd = Sshd::start(&["alpha", "beta"]);
    fleet(&sshd);
    configure(
        &sshd,
        &trigger_command(&sshd),
        &[("alpha", "tags = [\"canary\"]\n")],
        "\n[rollout]\nwaves = [\"@canary\", \"100%\"]\n",
    );
    let store = OnStore::new(&sshd);
    let f = sshd.fleet();
    ok(run(&f, &["publish", "--no-eval"]));
    let machines: Vec<Machine<'_>> = ["alpha", "beta"]
        .iter()
        .map(|h| {
            let m = store.machine(&sshd, h, "");
            let out = m.update();
            assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
            m
        })
        .collect();
    let runs = |m: &Machine<'_>, v: &str| {
        m.profile_target()
            .is_some_and(|p| p.ends_with(&format!("-{}-{v}", m.host)))
    };
    assert!(machines.iter().all(|m| runs(m, "1")));

    write_version(&sshd, "2");
    let out = run(
        &f,
        &["rollout", "--trigger", "--wait-timeout", "120s", "--json"],
    );
    assert_eq!(code(&out), 0, "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["phase"], "done", "{summary}");
    assert!(machines.iter().all(|m| runs(m, "2")), "every host on 2");
    // The canary's report came before the second wave's: alpha's run finished first.
    let (a, b) = (store.latest("alpha"), store.latest("beta"));
    assert_eq!((a.outcome, b.outcome), (Outcome::Success, Outcome::Success));
    assert!(a.finished <= b.started, "{a:?} {b:?}");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&ok(run(&f, &["status", "--json"]))).unwrap();
    assert!(rows.iter().all(|r| r["state"] == "up-to-date"), "{rows:?}");
}
