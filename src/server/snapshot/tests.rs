//! Scanning trees: links resolved, bad links named, special files refused.

use super::*;
use std::os::unix::fs::symlink;

fn scanner(root: &Path) -> Scanner {
    Scanner::new(
        fs::canonicalize(root).unwrap(),
        HashCache::default(),
        SystemTime::now(),
    )
}

/// `common/a.nix` ("a") and `common/sub/b.nix` ("b") under `r`.
fn common(r: &Path) {
    fs::create_dir_all(r.join("common/sub")).unwrap();
    fs::write(r.join("common/a.nix"), "a").unwrap();
    fs::write(r.join("common/sub/b.nix"), "b").unwrap();
}

fn paths(items: &[Item]) -> Vec<&str> {
    items.iter().map(|i| &*i.path).collect()
}

#[test]
fn resolves_links_and_skips_droppings() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    common(r);
    fs::create_dir_all(r.join("hosts/h1/.git")).unwrap();
    fs::write(r.join("hosts/h1/configuration.nix"), "c").unwrap();
    fs::write(r.join("hosts/h1/configuration.nix~"), "old").unwrap();
    fs::write(r.join("hosts/h1/.configuration.nix.swp"), "swap").unwrap();
    symlink("../../common", r.join("hosts/h1/common")).unwrap();
    symlink("../../common/a.nix", r.join("hosts/h1/a.nix")).unwrap();
    symlink("/nix/store/nothing", r.join("hosts/h1/result")).unwrap();
    let s = scanner(r);
    let items = s.scan(&r.join("hosts/h1")).unwrap();
    assert_eq!(
        paths(&items),
        [
            "a.nix",
            "common",
            "common/a.nix",
            "common/sub",
            "common/sub/b.nix",
            "configuration.nix"
        ]
    );
    let ItemKind::File { sha256, source, .. } = &items[0].kind else {
        panic!("a.nix is a file")
    };
    assert_eq!(*sha256, Digest::of(b"a"));
    assert!(source.ends_with("common/a.nix"));
}

#[test]
fn bad_links_are_named() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("repo");
    fs::create_dir_all(r.join("h")).unwrap();
    fs::write(t.path().join("outside"), "x").unwrap();

    symlink("../../outside", r.join("h/esc")).unwrap();
    let err = scanner(&r).scan(&r.join("h")).unwrap_err();
    assert!(matches!(err, SnapshotError::Escape { .. }), "{err}");
    assert!(err.to_string().contains("h/esc"), "{err}");
    fs::remove_file(r.join("h/esc")).unwrap();

    symlink("nothing-here", r.join("h/dangling")).unwrap();
    let err = scanner(&r).scan(&r.join("h")).unwrap_err();
    assert!(matches!(err, SnapshotError::Dangling { .. }), "{err}");
    assert!(err.to_string().contains("h/dangling"), "{err}");
    fs::remove_file(r.join("h/dangling")).unwrap();

    symlink("self", r.join("h/self")).unwrap();
    let err = scanner(&r).scan(&r.join("h")).unwrap_err();
    assert!(matches!(err, SnapshotError::Loop { .. }), "{err}");
    fs::remove_file(r.join("h/self")).unwrap();

    fs::create_dir_all(r.join("h/d")).unwrap();
    symlink("..", r.join("h/d/up")).unwrap();
    let err = scanner(&r).scan(&r.join("h")).unwrap_err();
    assert!(matches!(err, SnapshotError::Loop { .. }), "{err}");
    assert!(err.to_string().contains("h/d/up"), "{err}");
}

#[test]
fn fifo_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        r.join("pipe"),
        FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let err = scanner(r).scan(r).unwrap_err();
    assert!(err.to_string().contains("FIFO"), "{err}");
}

#[test]
fn hosts_linking_one_directory_share_its_items_and_each_scan_is_its_own() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    common(r);
    fs::create_dir_all(r.join("other")).unwrap();
    fs::write(r.join("other/o.nix"), "o").unwrap();
    for h in ["h1", "h2", "h3", "h4", "h5"] {
        fs::create_dir_all(r.join("hosts").join(h)).unwrap();
        fs::write(r.join("hosts").join(h).join("configuration.nix"), h).unwrap();
    }
    symlink("../../common", r.join("hosts/h1/common")).unwrap();
    symlink("../../common", r.join("hosts/h2/common")).unwrap();
    // The same directory under another name, and a plain directory of the same name.
    symlink("../../common", r.join("hosts/h3/shared")).unwrap();
    fs::create_dir_all(r.join("hosts/h4/common/sub")).unwrap();
    fs::write(r.join("hosts/h4/common/a.nix"), "a").unwrap();
    fs::write(r.join("hosts/h4/common/sub/b.nix"), "own b").unwrap();
    // Another directory linked under the same name.
    symlink("../../other", r.join("hosts/h5/common")).unwrap();

    let s = scanner(r);
    let scans: Vec<_> = ["h1", "h2", "h3", "h4", "h5"]
        .iter()
        .map(|h| s.scan(&r.join("hosts").join(h)).unwrap())
        .collect();
    // Each host's items are what a scanner that saw no other host finds.
    for (h, items) in ["h1", "h2", "h3", "h4", "h5"].iter().zip(&scans) {
        let alone = scanner(r).scan(&r.join("hosts").join(h)).unwrap();
        assert_eq!(**items, *alone, "{h}");
    }
    let expected = |name: &str| {
        [
            name.to_owned(),
            format!("{name}/a.nix"),
            format!("{name}/sub"),
            format!("{name}/sub/b.nix"),
            "configuration.nix".to_owned(),
        ]
    };
    assert_eq!(paths(&scans[0]), expected("common"));
    assert_eq!(paths(&scans[2])[1..], expected("shared")[..4]);
    assert_eq!(
        paths(&scans[4]),
        ["common", "common/o.nix", "configuration.nix"]
    );
    // h4's own `common/sub/b.nix` is its own file, not the shared one.
    let b = |items: &[Item]| match &items[3].kind {
        ItemKind::File { sha256, .. } => *sha256,
        ItemKind::Dir => panic!("{} is a file", items[3].path),
    };
    assert_eq!(b(&scans[0]), Digest::of(b"b"));
    assert_eq!(b(&scans[3]), Digest::of(b"own b"));
    // h1 and h2 link it under one name: the paths are made once.
    for ((a, b), own) in scans[0]
        .iter()
        .zip(scans[1].iter())
        .zip(scans[3].iter())
        .take(4)
    {
        assert!(Arc::ptr_eq(&a.path, &b.path), "{}", a.path);
        assert!(!Arc::ptr_eq(&a.path, &own.path), "{}", a.path);
    }
}
