//! A publish killed after its k-th mutating request, for every k over a small changed
//! fleet, over the in-memory store and over a chroot in a temporary directory: every host
//! is left on a whole version (the old one or the new one, signed), and the next publish
//! leaves only the kept versions' keys.

use std::collections::BTreeSet;

use super::fixture::plan;
use super::{live_version, publish_host, HostPlan, KEEP_VERSIONS};
use crate::protocol::layout::{Area, Chroot, Key};
use crate::protocol::manifest::{Digest, Manifest};
use crate::protocol::signing::Signer;
use crate::protocol::HostName;
use crate::server::chroot::Ownership;
use crate::server::store::{ChrootStore, Faulty, MemStore, Store};

fn name(h: &str) -> HostName {
    HostName::new(h).unwrap()
}

/// [`fleet`] in format 2 when `trees`.
fn fleet_as(round: u64, trees: bool) -> Vec<HostPlan> {
    let mut plans = fleet(round);
    if trees {
        let t = tempfile::tempdir().unwrap();
        let packer = super::packs::Packer::load(t.path().join(super::packs::MEMO));
        for p in &mut plans {
            packer.pack(p).unwrap();
        }
    }
    plans
}

/// Three hosts sharing a file; `round` changes alpha's own file and, from round 2, the
/// shared one (beta and alpha), while gamma stays the same.
fn fleet(round: u64) -> Vec<HostPlan> {
    let shared = if round >= 2 { "shared v2" } else { "shared v1" };
    let secs = 1_790_000_000 + round * 100;
    vec![
        plan(
            "alpha",
            &[
                ("shared.nix", shared),
                ("own.nix", &format!("alpha {round}")),
            ],
            secs,
        ),
        plan("beta", &[("shared.nix", shared), ("own.nix", "beta")], secs),
        plan(
            "gamma",
            &[("shared.nix", "shared v1"), ("own.nix", "gamma")],
            secs,
        ),
    ]
}

/// One publish run as `publish::run` makes it: every host, then the shared GC. A killed
/// publisher's requests all fail from some point on, so errors are expected and ignored.
fn publish_all(store: &dyn Store, plans: &[HostPlan], numbering: &super::Numbering<'_>) {
    let mut changed = false;
    for p in plans {
        if let Ok(r) = publish_host(store, p, numbering) {
            changed |= r.changed();
        }
    }
    if changed {
        let _ = store.collect_shared();
    }
}

/// Every host is on a whole, signed version whose content is one of `allowed`.
fn assert_whole(store: &dyn Store, allowed: &[&[HostPlan]], k: usize) {
    for host in ["alpha", "beta", "gamma"].map(name) {
        let (digest, live) = live_version(store, &host)
            .unwrap_or_else(|| panic!("k={k}: {host} has no whole live version"));
        assert!(
            store.exists(&host, &Key::Signature(digest)).unwrap(),
            "k={k}: {host}'s live version is unsigned"
        );
        for object in live.objects() {
            assert!(
                store.exists(&host, &Key::Object(object)).unwrap(),
                "k={k}: {host}'s live version misses an object"
            );
        }
        assert!(
            allowed
                .iter()
                .flat_map(|plans| plans.iter())
                .any(|p| p.host == host && p.manifest.same_content(&live)),
            "k={k}: {host} is live on content no publish asked for"
        );
    }
}

/// Only the kept versions' keys: at most `KEEP_VERSIONS` manifests, each signed, each with
/// all its objects, no object or signature that no kept manifest needs.
fn assert_only_kept(store: &dyn Store, k: usize) {
    for host in ["alpha", "beta", "gamma"].map(name) {
        let manifests = store.list(&host, Area::Manifests).unwrap();
        let kept: Vec<Manifest> = manifests
            .iter()
            .filter_map(|key| match key {
                Key::Manifest(_) => store.get(&host, key, u64::MAX).unwrap(),
                _ => None,
            })
            .map(|b| {
                let mut m = Manifest::parse(&b).unwrap();
                crate::server::store::trees::expand(store, &host, &mut m).unwrap();
                m
            })
            .collect();
        assert!(
            (1..=KEEP_VERSIONS).contains(&kept.len()),
            "k={k}: {host} keeps {}",
            kept.len()
        );
        for key in &manifests {
            match key {
                Key::Signature(d) => assert!(
                    manifests.contains(&Key::Manifest(*d)),
                    "k={k}: {host}: signature without its manifest"
                ),
                // A publish killed between a manifest and its signature left it: no host
                // trusting the key can use it, so it is not a kept version.
                Key::Manifest(d) => assert!(
                    manifests.contains(&Key::Signature(*d)),
                    "k={k}: {host}: a kept manifest without its signature"
                ),
                _ => {}
            }
        }
        let used: BTreeSet<Digest> = kept.iter().flat_map(|m| m.objects()).collect();
        let present = crate::server::store::listed_objects(store, &host).unwrap();
        assert_eq!(
            present, used,
            "k={k}: {host}'s objects are not the kept ones"
        );
    }
}

/// Runs the whole scenario for every k on fresh stores from `fresh`, with `after` checking
/// store-specific leftovers; returns how many k were tried. Format 2 when `trees`.
fn every_k(
    fresh: &dyn Fn() -> Box<dyn Store>,
    after: &dyn Fn(&dyn Store, usize),
    trees: bool,
) -> usize {
    let key_dir = tempfile::tempdir().unwrap();
    let key = key_dir.path().join("key");
    crate::protocol::signing::generate(&key, "test").unwrap();
    let signer = Signer::load(&key).unwrap();
    let (v1, v2, v3) = (fleet_as(1, trees), fleet_as(2, trees), fleet_as(3, trees));
    for k in 0..500 {
        let store = fresh();
        // The publisher's serial record, as `bento publish` keeps it: the next publish
        // numbers above what the killed one recorded, so what that one left is never
        // renumbered away and only GC can remove it.
        let records = tempfile::tempdir().unwrap();
        let serials = crate::server::records::Serials::new(records.path());
        let versions = super::versions::Versions::default();
        let numbering = super::Numbering {
            signer: Some(&signer),
            record: Some(&serials),
            floor: None,
            dry_run: false,
            stamping: None,
            versions: Some(&versions),
        };
        publish_all(&*store, &v1, &numbering);
        let faulty = Faulty::new(&*store, k);
        publish_all(&faulty, &v2, &numbering);
        assert_whole(&*store, &[&v1, &v2], k);
        // The next publish (other content again) clears what the killed one left.
        publish_all(&*store, &v3, &numbering);
        assert_whole(&*store, &[&v3], k);
        assert_only_kept(&*store, k);
        after(&*store, k);
        if faulty.requests() <= k {
            // The publish ran to its end within k requests: every moment was covered.
            assert!(
                k > 5,
                "a changed fleet's publish makes more than 5 requests"
            );
            return k;
        }
    }
    panic!("a publish of three hosts never finished within 500 requests");
}

#[test]
fn a_publish_killed_after_any_request_leaves_whole_versions_in_memory() {
    let tried = every_k(&|| Box::new(MemStore::new()), &|_, _| {}, false);
    assert!(tried > 5);
}

/// Format 2, with the publisher's memo of kept versions shared by the runs.
#[test]
fn a_publish_killed_after_any_request_leaves_whole_format_2_versions_in_memory() {
    let tried = every_k(&|| Box::new(MemStore::new()), &|_, _| {}, true);
    assert!(tried > 5);
}

#[test]
fn a_publish_killed_after_any_request_leaves_whole_versions_in_a_chroot() {
    let roots = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    let root_of = |i: usize| roots.path().join(format!("c{i}"));
    let fresh = || -> Box<dyn Store> {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let store = ChrootStore::new(Chroot::new(root_of(i)), Ownership::Leave);
        drop(store.lock(Box::new(|| {})).unwrap());
        Box::new(store)
    };
    every_k(
        &fresh,
        &|_store, k| {
            let chroot = Chroot::new(root_of(n.load(std::sync::atomic::Ordering::Relaxed) - 1));
            // The pool holds only what some host links to, and no temporary file is left.
            for entry in std::fs::read_dir(chroot.pool_dir()).unwrap() {
                use std::os::unix::fs::MetadataExt;
                let meta = entry.unwrap().metadata().unwrap();
                assert!(meta.nlink() > 1, "k={k}: a pooled object no host uses");
            }
            assert_eq!(std::fs::read_dir(chroot.tmp_dir()).unwrap().count(), 0);
            for host in ["alpha", "beta", "gamma"] {
                for dir in ["", "manifests", "objects"] {
                    let leftovers = std::fs::read_dir(chroot.root.join(host).join(dir))
                        .unwrap()
                        .filter(|e| {
                            let name = e.as_ref().unwrap().file_name();
                            name.to_string_lossy()
                                .starts_with(crate::sys::atomic::TMP_PREFIX)
                        })
                        .count();
                    assert_eq!(leftovers, 0, "k={k}: temporary files in {host}/{dir}");
                }
            }
        },
        false,
    );
}
