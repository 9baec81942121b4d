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

fn paths(items: &[Item]) -> Vec<&str> {
    items.iter().map(|i| i.path.as_str()).collect()
}

#[test]
fn resolves_links_and_skips_droppings() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    fs::create_dir_all(r.join("common/sub")).unwrap();
    fs::write(r.join("common/a.nix"), "a").unwrap();
    fs::write(r.join("common/sub/b.nix"), "b").unwrap();
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
