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
const FIRMWARE: &str = "/nix/store/3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d-firmware-1";

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
    let contents = format!("NAR of {path}").into_bytes();
    // The agent decompresses the file and checks it against the signed NarHash/NarSize.
    let nar = ruzstd::encoding::compress_to_vec(
        &contents[..],
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    let nar_hash: [u8; 32] = sha2::Sha256::digest(&contents).into();
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
        nar_hash: format!("sha256:{}", nix32(&nar_hash)),
        nar_size: contents.len() as u64,
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
    // The run's log says what happened: substituted, not built (issue #24 item 11).
    let gz = std::fs::read(bed.chroot.join("logs").join(report.log_file_name())).unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut log)
        .unwrap();
    assert!(log.contains(&format!("substituted {SYSTEM}")), "{log}");
    assert!(!log.contains(&format!("built {SYSTEM}")), "{log}");
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
                let size = format!("NarSize: {}", format!("NAR of {KERNEL}").len());
                assert!(text.contains(&size));
                std::fs::write(&p, text.replace(&size, "NarSize: 4001")).unwrap();
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

/// A closure three levels deep with two paths on the middle level, each signed by `ours`
/// except `foreign`, signed by another key.
fn export_closure(bed: &Bed, ours: &ed25519_dalek::SigningKey, foreign: Option<&str>) {
    let other = signing_key(8).0;
    for (path, refs) in [
        (SYSTEM, &[SYSTEM, KERNEL, FIRMWARE][..]),
        (KERNEL, &[LIBC][..]),
        (FIRMWARE, &[][..]),
        (LIBC, &[][..]),
    ] {
        let sk = if foreign == Some(path) { &other } else { ours };
        export(&bed.chroot, path, refs, sk);
    }
}

#[test]
fn agent_refuses_a_foreign_signature_anywhere_in_the_closure_and_fetches_no_nar() {
    for foreign in [SYSTEM, KERNEL, FIRMWARE, LIBC] {
        let (bed, sk) = bed("ours");
        export_closure(&bed, &sk, Some(foreign));
        bed.publish_prebuilt(SYSTEM);
        let r = bed.run();
        assert_eq!(r.exit_code(), RunResult::EXIT_FAILED, "{foreign}: {r:?}");
        assert_eq!(bed.take_calls(), Vec::<String>::new(), "{foreign}");
        let error = bed.latest().unwrap().error.unwrap_or_default();
        assert!(
            error.contains(foreign) && error.contains("no signature by a trusted cache key"),
            "{foreign}: {error}"
        );
        // Not one NAR was downloaded: the local cache was never created.
        assert!(
            !StateDir::new(&bed.cfg.state_dir).nix_cache().exists(),
            "{foreign}"
        );
        assert_eq!(*bed.host.running.borrow(), Some(store_path("old")));
    }
}

/// A source that records how the walk asks for files.
struct Recording {
    inner: Box<dyn Connection>,
    /// The size of each `read_many` and `size_many` batch.
    batches: Vec<usize>,
    /// `size` and `read` calls for a file of `cache/` (one round trip each).
    single: usize,
}

impl source::Source for Recording {
    fn size(&mut self, item: source::Item) -> Result<Option<u64>, RemoteError> {
        self.single += usize::from(matches!(item, source::Item::Cache(_)));
        self.inner.size(item)
    }
    fn read(&mut self, item: source::Item, limit: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        self.single += usize::from(matches!(item, source::Item::Cache(_)));
        self.inner.read(item, limit)
    }
    fn read_objects(&mut self, parts: &[source::ObjectPart]) -> Result<u64, RemoteError> {
        self.inner.read_objects(parts)
    }
    fn read_many(
        &mut self,
        items: &[source::Item],
        limit: u64,
    ) -> Result<Vec<Option<Vec<u8>>>, RemoteError> {
        self.batches.push(items.len());
        self.inner.read_many(items, limit)
    }
    fn size_many(&mut self, items: &[source::Item]) -> Result<Vec<Option<u64>>, RemoteError> {
        self.batches.push(items.len());
        self.inner.size_many(items)
    }
}

#[test]
fn narinfos_are_read_one_batch_per_level_of_the_closure() {
    let (bed, sk) = bed("ours");
    export_closure(&bed, &sk, None);
    let mut src = Recording {
        inner: source::connect(
            &source::ServerUrl::Dir(bed.chroot.clone()),
            &bed.cfg.ssh_options(),
        )
        .unwrap(),
        batches: Vec::new(),
        single: 0,
    };
    let cache = bed.chroot.parent().unwrap().join("nix-cache");
    let prepared = crate::agent::substitute::prepare(
        &mut src,
        &bed.host,
        &bed.cfg.cache_keys,
        &StorePath::new(SYSTEM).unwrap(),
        &cache,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(prepared.narinfos, 4);
    // The system's narinfo, then the kernel's and firmware's together, then glibc's, then
    // the four NARs' sizes: a batch per level, not a round trip per path.
    assert_eq!(src.batches, [1, 2, 1, 4]);
    assert_eq!(src.single, 0);
}
