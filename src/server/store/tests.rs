//! The contract every store keeps, run over the in-memory store and a chroot in a temporary
//! directory, and what only the chroot promises (modes, hard links to its pool).

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;
use crate::protocol::layout::{self, Chroot};
use crate::server::chroot::Ownership;

fn alpha() -> HostName {
    HostName::new("alpha").unwrap()
}

fn bytes_of(b: &'static [u8]) -> impl Fn() -> io::Result<Box<dyn Read>> + Sync {
    move || Ok(Box::new(io::Cursor::new(b)) as Box<dyn Read>)
}

fn never() -> io::Result<Box<dyn Read>> {
    panic!("an object already there must not be read again")
}

/// Every store, fresh, with `alpha`'s area ready.
fn stores() -> (tempfile::TempDir, Vec<Box<dyn Store>>) {
    let tmp = tempfile::tempdir().unwrap();
    let chroot = ChrootStore::new(Chroot::new(tmp.path().join("c")), Ownership::Leave);
    drop(chroot.lock(Box::new(|| {})).unwrap());
    let stores: Vec<Box<dyn Store>> = vec![Box::new(MemStore::new()), Box::new(chroot)];
    for s in &stores {
        s.open_host(&alpha()).unwrap();
    }
    (tmp, stores)
}

#[test]
fn current_switches_only_from_the_version_read() {
    let (_tmp, stores) = stores();
    let (d1, d2) = (Digest::of(b"one"), Digest::of(b"two"));
    for s in &stores {
        assert!(s.current(&alpha()).unwrap().is_none());
        s.switch_current(&alpha(), &d1, None).unwrap();
        // `None` means "must not exist yet": a second first publish loses.
        let err = s.switch_current(&alpha(), &d2, None).unwrap_err();
        assert!(matches!(err, StoreError::Raced { .. }), "{err}");
        let (text, v1) = s.current(&alpha()).unwrap().unwrap();
        assert_eq!(text, layout::current_text(&d1).as_bytes());
        s.switch_current(&alpha(), &d2, Some(&v1)).unwrap();
        // The version read before that switch is stale now.
        let err = s.switch_current(&alpha(), &d1, Some(&v1)).unwrap_err();
        assert!(err.to_string().contains("another publish won"), "{err}");
        let (text, _) = s.current(&alpha()).unwrap().unwrap();
        assert_eq!(text, layout::current_text(&d2).as_bytes());
    }
}

#[test]
fn objects_are_verified_and_stored_once() {
    let (_tmp, stores) = stores();
    let good = Digest::of(b"content");
    for s in &stores {
        let err = s
            .put_object(&alpha(), &good, &bytes_of(b"changed since the scan"))
            .unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch(_)), "{err}");
        assert!(!s.exists(&alpha(), &Key::Object(good)).unwrap());
        assert_eq!(
            s.put_object(&alpha(), &good, &bytes_of(b"content"))
                .unwrap(),
            Some(7)
        );
        // An object the host holds already is `None`, unread.
        assert_eq!(s.put_object(&alpha(), &good, &never).unwrap(), None);
        assert_eq!(
            s.get(&alpha(), &Key::Object(good), 100).unwrap().unwrap(),
            b"content"
        );
        assert!(matches!(
            s.get(&alpha(), &Key::Object(good), 3),
            Err(StoreError::TooLarge { .. })
        ));
        assert_eq!(
            s.get_prefix(&alpha(), &Key::Object(good), 3)
                .unwrap()
                .unwrap(),
            b"con"
        );
        assert_eq!(
            s.list(&alpha(), Area::Objects).unwrap(),
            [Key::Object(good)]
        );
        s.delete(&alpha(), &Key::Object(good)).unwrap();
        s.delete(&alpha(), &Key::Object(good)).unwrap();
        assert!(s.get(&alpha(), &Key::Object(good), 100).unwrap().is_none());
    }
}

#[test]
fn each_key_is_written_only_by_its_own_operation() {
    let (_tmp, stores) = stores();
    let d = Digest::of(b"m");
    let log = Key::Log(SubPath::new("latest.json").unwrap());
    for s in &stores {
        for key in [Key::Current, Key::Object(d), log.clone()] {
            assert!(
                matches!(
                    s.put(&alpha(), &key, b"x"),
                    Err(StoreError::WrongOperation(_))
                ),
                "{key:?}"
            );
        }
        assert!(matches!(
            s.delete(&alpha(), &log),
            Err(StoreError::WrongOperation(_))
        ));
        s.put(&alpha(), &Key::Manifest(d), b"{}").unwrap();
        s.put(&alpha(), &Key::Signature(d), b"sig").unwrap();
        let nar = Key::Cache(SubPath::new("nar/abc.nar.zst").unwrap());
        s.put(&alpha(), &nar, b"nar").unwrap();
        assert_eq!(
            s.list(&alpha(), Area::Manifests).unwrap(),
            [Key::Manifest(d), Key::Signature(d)]
        );
        assert_eq!(s.list(&alpha(), Area::Cache).unwrap(), [nar]);
        assert_eq!(s.hosts().unwrap(), [alpha()]);
    }
}

#[test]
fn the_chroot_pools_objects_with_todays_modes_and_reads_logs_with_their_time() {
    let tmp = tempfile::tempdir().unwrap();
    let chroot = Chroot::new(tmp.path().join("c"));
    let store = ChrootStore::new(chroot.clone(), Ownership::Leave);
    let _lock = store.lock(Box::new(|| {})).unwrap();
    let beta = HostName::new("beta").unwrap();
    let d = Digest::of(b"shared");
    for h in [alpha(), beta.clone()] {
        store.open_host(&h).unwrap();
        store.put_object(&h, &d, &bytes_of(b"shared")).unwrap();
    }
    let pooled = chroot.pool_dir().join(d.to_hex());
    let meta = std::fs::metadata(&pooled).unwrap();
    assert_eq!(meta.nlink(), 3, "one pooled copy, linked into both hosts");
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    store.put(&alpha(), &Key::Manifest(d), b"{}").unwrap();
    store.switch_current(&alpha(), &d, None).unwrap();
    for key in [Key::Manifest(d), Key::Current] {
        let mode = std::fs::metadata(store.locate(&alpha(), &key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "{key:?}");
    }
    // A temporary file left in manifests/ is no key.
    std::fs::write(
        chroot.host_dir(&alpha()).join("manifests/.tmp-1-2-x.json"),
        b"",
    )
    .unwrap();
    assert_eq!(
        store.list(&alpha(), Area::Manifests).unwrap(),
        [Key::Manifest(d)]
    );
    // The pool keeps what a host still links.
    store.delete(&alpha(), &Key::Object(d)).unwrap();
    assert_eq!(store.collect_shared().unwrap(), 0);
    store.delete(&beta, &Key::Object(d)).unwrap();
    assert_eq!(store.collect_shared().unwrap(), 1);
    assert!(!pooled.exists());

    std::fs::write(chroot.host_dir(&alpha()).join("logs/latest.json"), b"{}").unwrap();
    let listed = store.list_logs(&alpha(), None).unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].modified.is_some());
    assert_eq!(
        store.read_log(&alpha(), None, "latest.json").unwrap(),
        b"{}"
    );
}

#[test]
fn shared_cache_files_are_put_whole_once_and_replaced_when_the_pool_changes() {
    let (tmp, stores) = stores();
    let pooled = tmp.path().join("pooled.nar");
    let key = Key::Cache(SubPath::new("nar/abc.nar.zst").unwrap());
    for s in &stores {
        std::fs::write(&pooled, b"nar one").unwrap();
        assert!(s.put_shared(&alpha(), &key, &pooled).unwrap());
        assert!(!s.put_shared(&alpha(), &key, &pooled).unwrap(), "no change");
        assert_eq!(
            s.get(&alpha(), &key, 100).unwrap().unwrap(),
            b"nar one".to_vec()
        );
        assert_eq!(s.list(&alpha(), Area::Cache).unwrap(), vec![key.clone()]);
        // A new pool file (a re-export) under the same name replaces the host's.
        std::fs::remove_file(&pooled).unwrap();
        std::fs::write(&pooled, b"nar two").unwrap();
        assert!(s.put_shared(&alpha(), &key, &pooled).unwrap());
        assert_eq!(
            s.get(&alpha(), &key, 100).unwrap().unwrap(),
            b"nar two".to_vec()
        );
        let err = s.put_shared(&alpha(), &Key::Current, &pooled).unwrap_err();
        assert!(matches!(err, StoreError::WrongOperation(_)), "{err}");
        std::fs::remove_file(&pooled).unwrap();
    }
    // The chroot links the pool's inode, root-writable only.
    std::fs::write(&pooled, b"nar three").unwrap();
    let chroot = Chroot::new(tmp.path().join("c"));
    stores[1].put_shared(&alpha(), &key, &pooled).unwrap();
    let linked = chroot.host_dir(&alpha()).join("cache/nar/abc.nar.zst");
    assert_eq!(
        std::fs::metadata(&linked).unwrap().ino(),
        std::fs::metadata(&pooled).unwrap().ino()
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&linked), 0o644);
    assert_eq!(mode(&chroot.host_dir(&alpha()).join("cache/nar")), 0o755);
}

#[test]
fn a_batched_version_has_its_names_only_once_committed_and_current_never_before() {
    let tmp = tempfile::tempdir().unwrap();
    let chroot = Chroot::new(tmp.path().join("c"));
    let store = ChrootStore::new(chroot.clone(), Ownership::Leave);
    drop(store.lock(Box::new(|| {})).unwrap());
    let beta = HostName::new("beta").unwrap();
    let batch = std::sync::Arc::new(crate::sys::batch::Batch::new(vec![chroot.root.clone()]));
    assert!(store.join_batch(batch.clone()));
    let object = Digest::of(b"shared");
    let manifest = Digest::of(b"manifest");
    for host in [alpha(), beta.clone()] {
        store.open_host(&host).unwrap();
        let sent = store
            .put_object(&host, &object, &bytes_of(b"shared"))
            .unwrap();
        // Sent once, for the first host; the second waits for that copy.
        let expected = if host == alpha() { 6 } else { 0 };
        assert_eq!(sent, Some(expected), "{host}");
        store
            .put(&host, &Key::Manifest(manifest), b"manifest")
            .unwrap();
        assert!(!store.exists(&host, &Key::Object(object)).unwrap());
        assert!(!store.exists(&host, &Key::Manifest(manifest)).unwrap());
    }
    assert!(!chroot.pool_dir().join(object.to_hex()).exists());

    // A switch before the commit commits first: `current` never names what is not there.
    store.switch_current(&alpha(), &manifest, None).unwrap();
    assert!(batch.is_empty());
    for host in [alpha(), beta.clone()] {
        assert!(store.exists(&host, &Key::Object(object)).unwrap(), "{host}");
        assert!(
            store.exists(&host, &Key::Manifest(manifest)).unwrap(),
            "{host}"
        );
    }
    let (text, _) = store.current(&alpha()).unwrap().unwrap();
    assert_eq!(text, layout::current_text(&manifest).as_bytes());
    let pooled = std::fs::metadata(chroot.pool_dir().join(object.to_hex())).unwrap();
    assert_eq!(pooled.nlink(), 3, "one inode: the pool and both hosts");
    // The other host's `current` is the one prepared in the batch, renamed.
    store.switch_current(&beta, &manifest, None).unwrap();
    let names: Vec<String> = std::fs::read_dir(chroot.host_dir(&beta))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(crate::sys::atomic::TMP_PREFIX))
        .collect();
    assert!(names.is_empty(), "no temporary file left: {names:?}");
}
