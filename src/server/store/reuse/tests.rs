//! Over a chroot in a temporary directory: what a new version pushes out lends the next one
//! its inodes, and only a clean end spares the next lock holder its sweep.

use std::os::unix::fs::MetadataExt;

use crate::protocol::layout;
use crate::protocol::manifest::Digest;
use crate::protocol::HostName;
use crate::server::store::tests::{alpha, made_chroot};
use crate::server::store::{Area, Key, Store, Version};

#[test]
fn what_a_new_version_pushes_out_lends_its_inodes_to_the_next_version() {
    let (_tmp, chroot, store) = made_chroot();
    let batch = std::sync::Arc::new(crate::sys::batch::Batch::new(vec![chroot.root.clone()]));
    assert!(store.join_batch(batch.clone()));
    let dir = chroot.host_dir(&alpha());
    let ino = |name: &str| {
        std::fs::symlink_metadata(dir.join(name))
            .map(|m| m.ino())
            .ok()
    };
    let keys = |d: Digest| [Key::Manifest(d), Key::Signature(d), Key::Fresh(d)];
    let publish = |body: &[u8], from: Option<Digest>| {
        let d = Digest::of(body);
        store.open_host(&alpha()).unwrap();
        for key in keys(d) {
            store.put(&alpha(), &key, body).unwrap();
        }
        let from = from.map(|f| Version(layout::current_text(&f)));
        store.switch_current(&alpha(), &d, from.as_ref()).unwrap();
        batch.commit().unwrap();
        d
    };
    let v1 = publish(b"the first version, the longest of them", None);
    let v2 = publish(b"the second version", Some(v1));
    // The switch kept the replaced `current` beside the new one.
    assert_eq!(
        std::fs::read(dir.join(".spare.current")).unwrap(),
        layout::current_text(&v1).as_bytes()
    );
    let (text, _) = store.current(&alpha()).unwrap().unwrap();
    assert_eq!(text, layout::current_text(&v2).as_bytes());
    let old_current = ino(".spare.current").unwrap();

    // Deleting v1 (pushed out) leaves its files as spares, which no listing shows.
    let retired: Vec<u64> = keys(v1).iter().map(|k| ino(&k.path()).unwrap()).collect();
    for key in keys(v1) {
        store.delete(&alpha(), &key).unwrap();
        assert!(!store.exists(&alpha(), &key).unwrap(), "{key:?}");
    }
    let spares = [
        "manifests/.spare.json",
        "manifests/.spare.sig",
        "manifests/.spare.fresh",
    ];
    assert_eq!(spares.map(|s| ino(s).unwrap()).to_vec(), retired);
    let listed = store.list(&alpha(), Area::Manifests).unwrap();
    assert_eq!(listed, {
        let mut k = keys(v2).to_vec();
        k.sort();
        k
    });

    // The next version is written into them: its files, and its `current`, are the retired
    // inodes, holding exactly the new bytes.
    let v3 = publish(b"third", Some(v2));
    let now: Vec<u64> = keys(v3).iter().map(|k| ino(&k.path()).unwrap()).collect();
    assert_eq!(now, retired);
    for key in keys(v3) {
        assert_eq!(
            store.get(&alpha(), &key, 1 << 20).unwrap().unwrap(),
            b"third",
            "{key:?}"
        );
    }
    assert_eq!(ino("current"), Some(old_current));
    let (text, _) = store.current(&alpha()).unwrap().unwrap();
    assert_eq!(text, layout::current_text(&v3).as_bytes());
    for spare in spares {
        assert_eq!(ino(spare), None, "{spare} lent");
    }
    let temps: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .chain(std::fs::read_dir(dir.join("manifests")).unwrap())
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(crate::sys::atomic::TMP_PREFIX))
        .collect();
    assert!(temps.is_empty(), "no temporary file left: {temps:?}");
}

#[test]
fn only_a_lock_holder_that_ended_clean_spares_the_next_one_the_sweep_of_every_host() {
    let (_tmp, chroot, store) = made_chroot();
    let beta = HostName::new("beta").unwrap();
    let plant = |host: &HostName| {
        let dir = chroot.host_dir(host);
        let files = [
            dir.join(".tmp-1-2-x"),
            dir.join("manifests/.tmp-1-3-y.json"),
        ];
        for f in &files {
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, b"half").unwrap();
        }
        files
    };
    let lock = || store.lock(Box::new(|| {})).unwrap();

    // A chroot that never saw a clean end (new, or from an older bento) is swept whole, the
    // hosts this run leaves alone too.
    let left = [plant(&alpha()), plant(&beta)].concat();
    let held = lock();
    assert!(left.iter().all(|f| !f.exists()), "{left:?}");
    // A version staged whose switch never came: its prepared `current` goes with a clean
    // end, which then spares the next holder the sweep.
    let batch = std::sync::Arc::new(crate::sys::batch::Batch::new(vec![chroot.root.clone()]));
    assert!(store.join_batch(batch.clone()));
    store.open_host(&alpha()).unwrap();
    let d = Digest::of(b"never switched");
    store
        .put(&alpha(), &Key::Manifest(d), b"never switched")
        .unwrap();
    batch.commit().unwrap();
    let prepared = chroot
        .host_dir(&alpha())
        .join(format!(".tmp-current-{}", d.to_hex()));
    assert!(prepared.exists());
    store.end_clean().unwrap();
    assert!(!prepared.exists());
    drop(held);
    let planted = plant(&beta);
    let held = lock();
    assert!(
        planted.iter().all(|f| f.exists()),
        "swept after a clean end"
    );

    // A holder that did not end clean (killed, failed, or not a publish) leaves the next
    // one a sweep.
    drop(held);
    let held = lock();
    assert!(planted.iter().all(|f| !f.exists()), "{planted:?}");
    drop(held);
}

#[test]
fn a_stamp_renewed_on_every_run_is_written_into_the_one_it_replaced_the_run_before() {
    let (_tmp, chroot, store) = made_chroot();
    let batch = std::sync::Arc::new(crate::sys::batch::Batch::new(vec![chroot.root.clone()]));
    assert!(store.join_batch(batch.clone()));
    store.open_host(&alpha()).unwrap();
    let key = Key::Fresh(Digest::of(b"the live version"));
    let spare = chroot.host_dir(&alpha()).join("manifests/.spare.fresh");
    for run in 0..4u8 {
        let stamp = format!("stamp of run {run}");
        store.put(&alpha(), &key, stamp.as_bytes()).unwrap();
        // The stamp replaced last run was lent to this one's.
        assert!(!spare.exists(), "run {run}");
        batch.commit().unwrap();
        assert_eq!(
            store.get(&alpha(), &key, 1 << 10).unwrap().unwrap(),
            stamp.as_bytes()
        );
        // And the one this run replaced is kept for the next, whole.
        if run > 0 {
            let before = format!("stamp of run {}", run - 1);
            assert_eq!(
                std::fs::read(&spare).unwrap(),
                before.as_bytes(),
                "run {run}"
            );
        }
    }
}
