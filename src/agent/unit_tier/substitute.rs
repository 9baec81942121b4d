//! Prebuilt delivery through the unit tier: a `file://` chroot whose `cache/` holds signed
//! narinfos and NAR files, and a fake store. The agent imports exactly the paths its store
//! lacks, never builds, and refuses a foreign signature, a tampered NAR, a missing narinfo
//! or a missing `cache_keys` before it changes anything.

use base64ct::Encoding as _;
use ed25519_dalek::Signer as _;
use sha2::Digest as _;

use super::*;
use crate::protocol::narinfo::{self, nix32, NarInfo};

const SYSTEM: &str = "/nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-nixos-system-alpha-2";
const KERNEL: &str = "/nix/store/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-linux-6.1.0";
const LIBC: &str = "/nix/store/2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c-glibc-2.39";

fn signing_key(seed: u8) -> (ed25519_dalek::SigningKey, String) {
    let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let public = format!(
        "bento-test-1:{}",
        base64ct::Base64::encode_string(sk.verifying_key().as_bytes())
    );
    (sk, public)
}

/// Writes `cache/<hash>.narinfo` and its NAR file for `path`, signed by `sk`.
fn export(chroot: &Path, path: &str, refs: &[&str], sk: &ed25519_dalek::SigningKey) {
    let cache = chroot.join(layout::CACHE);
    std::fs::create_dir_all(cache.join("nar")).unwrap();
    let nar = format!("NAR of {path}").into_bytes();
    let file_hash: [u8; 32] = sha2::Sha256::digest(&nar).into();
    let url = format!("nar/{}.nar.zst", nix32(&file_hash));
    std::fs::write(cache.join(&url), &nar).unwrap();
    let refs: Vec<String> = refs
        .iter()
        .map(|r| r["/nix/store/".len()..].to_owned())
        .collect();
    let mut info = NarInfo {
        store_path: path.into(),
        url: url.clone(),
        compression: "zstd".into(),
        file_hash: Some(format!("sha256:{}", nix32(&file_hash))),
        file_size: Some(nar.len() as u64),
        nar_hash: "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into(),
        nar_size: 4000,
        references: refs.clone(),
        deriver: None,
        sigs: vec![],
        ca: None,
    };
    let sig = sk.sign(info.fingerprint().as_bytes());
    info.sigs.push(format!(
        "bento-test-1:{}",
        base64ct::Base64::encode_string(&sig.to_bytes())
    ));
    let text = format!(
        "StorePath: {path}\nURL: {url}\nCompression: zstd\nFileHash: {}\nFileSize: {}\nNarHash: {}\nNarSize: {}\nReferences: {}\nSig: {}\n",
        info.file_hash.as_ref().unwrap(),
        nar.len(),
        info.nar_hash,
        info.nar_size,
        refs.join(" "),
        info.sigs[0]
    );
    let name = format!("{}.narinfo", narinfo::hash_part(path));
    std::fs::write(cache.join(name), text).unwrap();
    std::fs::write(cache.join(layout::CACHE_INFO), narinfo::CACHE_INFO).unwrap();
}

impl Bed {
    /// A version naming `system` as what to run (what publish writes for build_on = "server").
    fn publish_prebuilt(&self, system: &str) -> Digest {
        let v = self.publish("ignored");
        let mut m =
            Manifest::parse(&std::fs::read(layout::manifest(&self.chroot, &v)).unwrap()).unwrap();
        m.system = Some(StorePath::new(system).unwrap());
        let bytes = m.to_bytes();
        let digest = Digest::of(&bytes);
        std::fs::write(layout::manifest(&self.chroot, &digest), &bytes).unwrap();
        std::fs::write(layout::current(&self.chroot), layout::current_text(&digest)).unwrap();
        digest
    }

    fn nar_of(&self, path: &str) -> PathBuf {
        let cache = self.chroot.join(layout::CACHE);
        let text =
            std::fs::read_to_string(cache.join(format!("{}.narinfo", narinfo::hash_part(path))))
                .unwrap();
        cache.join(NarInfo::parse(&text).unwrap().url)
    }
}

use crate::protocol::StorePath;

fn bed(keys: &str) -> (Bed, ed25519_dalek::SigningKey) {
    bed_with(keys, "")
}

fn bed_with(keys: &str, more_toml: &str) -> (Bed, ed25519_dalek::SigningKey) {
    let (sk, public) = signing_key(7);
    let extra = more_toml.to_owned()
        + &match keys {
            "ours" => format!("cache_keys = [\"{public}\"]\n"),
            "other" => format!("cache_keys = [\"{}\"]\n", signing_key(8).1),
            _ => String::new(),
        };
    let bed = Bed::new(&extra);
    *bed.host.running.borrow_mut() = Some(store_path("old"));
    (bed, sk)
}

#[test]
fn agent_substitutes_only_the_paths_its_store_lacks_and_never_builds() {
    let (bed, sk) = bed("ours");
    export(&bed.chroot, SYSTEM, &[SYSTEM, KERNEL], &sk);
    export(&bed.chroot, KERNEL, &[LIBC], &sk);
    export(&bed.chroot, LIBC, &[], &sk);
    // The store has the kernel (and so its closure): only the system is fetched.
    bed.host
        .store
        .borrow_mut()
        .extend([KERNEL, LIBC].map(|p| StorePath::new(p).unwrap()));
    // The kernel's NAR is gone from the server: fetching it would fail the run.
    std::fs::remove_file(bed.nar_of(KERNEL)).unwrap();
    let v = bed.publish_prebuilt(SYSTEM);
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_UPDATED, "{r:?}");
    assert_eq!(
        bed.take_calls(),
        [
            "substitute 1 path(s)",
            "set_profile nixos-system-alpha-2",
            "activate nixos-system-alpha-2 switch"
        ]
    );
    let report = bed.latest().unwrap();
    assert_eq!((report.outcome, report.version), (Outcome::Success, v));
    assert_eq!(report.system_after.as_deref(), Some(SYSTEM));
    // The local cache is emptied once the paths are in the store.
    assert!(!StateDir::new(&bed.cfg.state_dir).nix_cache().exists());
}

#[test]
fn agent_refuses_a_prebuilt_system_it_cannot_trust_before_changing_anything() {
    type Spoil = fn(&Bed);
    let cases: [(&str, Spoil, &str); 5] = [
        ("other", |_| {}, "no signature by a trusted cache key"),
        ("none", |_| {}, "no cache_keys"),
        (
            "ours",
            |b| {
                let nar = b.nar_of(KERNEL);
                let mut bytes = std::fs::read(&nar).unwrap();
                bytes[0] ^= 1;
                std::fs::write(&nar, bytes).unwrap();
            },
            "the narinfo says sha256:",
        ),
        (
            "ours",
            |b| {
                let name = format!("{}.narinfo", narinfo::hash_part(LIBC));
                std::fs::remove_file(b.chroot.join(layout::CACHE).join(name)).unwrap();
            },
            "missing from the server's cache",
        ),
        (
            "ours",
            |b| {
                // Signed fields changed after signing: the signature no longer matches.
                let name = format!("{}.narinfo", narinfo::hash_part(KERNEL));
                let p = b.chroot.join(layout::CACHE).join(name);
                let text = std::fs::read_to_string(&p).unwrap();
                std::fs::write(&p, text.replace("NarSize: 4000", "NarSize: 4001")).unwrap();
            },
            "no signature by a trusted cache key",
        ),
    ];
    for (keys, spoil, needle) in cases {
        let (bed, sk) = bed(keys);
        export(&bed.chroot, SYSTEM, &[SYSTEM, KERNEL], &sk);
        export(&bed.chroot, KERNEL, &[LIBC], &sk);
        export(&bed.chroot, LIBC, &[], &sk);
        spoil(&bed);
        bed.publish_prebuilt(SYSTEM);
        let r = bed.run();
        assert_eq!(r.exit_code(), RunResult::EXIT_FAILED, "{needle}: {r:?}");
        assert_eq!(bed.take_calls(), Vec::<String>::new(), "{needle}");
        let report = bed.latest().unwrap();
        let error = report.error.unwrap_or_default();
        assert!(error.contains(needle), "{needle}: {error}");
        assert!(
            error.contains("/nix/store/"),
            "names the store path: {error}"
        );
        assert_eq!(*bed.host.running.borrow(), Some(store_path("old")));
    }
}

#[test]
fn agent_never_self_updates_a_version_the_server_builds() {
    let (bed, sk) = bed_with("ours", "self_update = true\n");
    export(&bed.chroot, SYSTEM, &[SYSTEM, KERNEL], &sk);
    export(&bed.chroot, KERNEL, &[LIBC], &sk);
    export(&bed.chroot, LIBC, &[], &sk);
    let v = bed.publish_prebuilt(SYSTEM);
    assert_eq!(bed.run().exit_code(), RunResult::EXIT_UPDATED);
    bed.take_calls();
    // Re-locking would move an input: a self-update would build on the host.
    *bed.host.relock_to.borrow_mut() = Some("relocked".into());
    for _ in 0..2 {
        let r = bed.run();
        assert!(
            matches!(&r, RunResult::NoOp { reason } if reason.contains("self-update skipped: the server builds this version")),
            "{r:?}"
        );
        assert_eq!(bed.take_calls(), Vec::<String>::new());
        bed.later(2 * 24 * 3600);
    }
    let report = bed.latest().unwrap();
    assert_eq!((report.kind, report.version), (RunKind::Published, v));
    assert!(!bed.heartbeat().auto_updated);
}
