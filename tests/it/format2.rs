//! Issue #26: manifest format 2 over the real parts (sshd, Nix). A host on format 1 takes
//! its first format-2 version; hosts share the trees and packs of `common/`; a change to
//! one common file is one new pack, of which the host reads only that file's range; a
//! tampered tree or pack entry is refused; a pack download cut halfway resumes; a rollback
//! goes back through the trees; a mirror made by `publish --export` serves format 2 by
//! ranges.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use bento::protocol::manifest::{Digest, Manifest, FORMAT, FORMAT_TREES};

use crate::agent::{code, fleet, text, Machine, EXIT_FAILED, EXIT_UPDATED};
use crate::common::relay::{Cut, Dir, Relay};
use crate::common::sshd::Sshd;
use crate::rollout::{row, status_json};
use crate::signing::live;

pub(crate) fn set_format_2(sshd: &Sshd) {
    let toml = sshd.fleet().join("bento.toml");
    let text = fs::read_to_string(&toml).unwrap();
    fs::write(
        &toml,
        text.replacen("[server]\n", "[server]\nformat = 2\n", 1),
    )
    .unwrap();
}

/// `n` small modules in `common/mods/` (shared by every host through its `common` link).
pub(crate) fn write_modules(sshd: &Sshd, n: usize, size: usize) {
    let dir = sshd.fleet().join("common/mods");
    fs::create_dir_all(&dir).unwrap();
    for i in 0..n {
        // Incompressible (ssh may compress): hashes, not a repeated letter.
        let noise: String = (0..size / 64 + 1)
            .map(|k| Digest::of(format!("{i}/{k}").as_bytes()).to_hex())
            .collect();
        let body = format!("# module {i}\n# {}\n", &noise[..size]);
        fs::write(dir.join(format!("m{i:03}.nix")), body).unwrap();
    }
}

fn live_manifest(sshd: &Sshd, host: &str) -> Manifest {
    let digest = live(sshd, host);
    let dir = sshd.host_dir(host);
    Manifest::parse(&fs::read(bento::protocol::layout::manifest(&dir, &digest)).unwrap()).unwrap()
}

fn objects(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir.join("objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_format_1_host_takes_format_2_and_a_common_change_is_one_new_pack() {
    let sshd = Sshd::start(&["alpha", "beta"]);
    write_modules(&sshd, 120, 200);
    fleet(&sshd);
    assert_eq!(live_manifest(&sshd, "alpha").format, FORMAT);
    let m = Machine::new(&sshd, "alpha", "");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let format_1_links = objects(&sshd.host_dir("alpha")).len();

    set_format_2(&sshd);
    sshd.publish();
    let two = live_manifest(&sshd, "alpha");
    assert_eq!(two.format, FORMAT_TREES);
    let mut expanded = two.clone();
    expanded
        .expand(|d| Ok(fs::read(sshd.host_dir("alpha").join("objects").join(d.to_hex())).unwrap()))
        .unwrap();
    assert!(
        expanded.objects().len() * 3 < format_1_links,
        "format 2 needs a few objects per version ({}), format 1 one per file ({format_1_links})",
        expanded.objects().len()
    );
    let links = objects(&sshd.host_dir("alpha"));
    // beta names the same common/ trees and packs: one file in the pool, linked twice.
    let beta = objects(&sshd.host_dir("beta"));
    let shared: Vec<&String> = links.intersection(&beta).collect();
    assert!(shared.len() >= 3, "common/ is shared: {shared:?}");
    for name in shared {
        let a = fs::metadata(sshd.host_dir("alpha").join("objects").join(name)).unwrap();
        let b = fs::metadata(sshd.host_dir("beta").join("objects").join(name)).unwrap();
        assert_eq!(a.ino(), b.ino(), "{name} is one inode");
    }

    // The upgrade: the format-1 state takes the format-2 version (same configuration).
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(
        text(&out).contains("unchanged (same system)"),
        "{}",
        text(&out)
    );
    assert_eq!(m.heartbeat().formats, vec![1, 2]);
    let rows = status_json(&sshd);
    assert_eq!(row(&rows, "alpha")["formats"], serde_json::json!([1, 2]));
    assert!(row(&rows, "beta")["formats"].is_null(), "beta never polled");
    // An agent older than format 2 writes no `formats`: status names it as the host that
    // cannot take this fleet's versions.
    let hb = sshd.host_dir("alpha").join("logs/heartbeat.json");
    let mut old: serde_json::Value = serde_json::from_slice(&fs::read(&hb).unwrap()).unwrap();
    old.as_object_mut().unwrap().remove("formats");
    let saved = fs::read(&hb).unwrap();
    fs::write(&hb, serde_json::to_vec(&old).unwrap()).unwrap();
    let rows = status_json(&sshd);
    let alpha = row(&rows, "alpha");
    assert_eq!(alpha["formats"], serde_json::json!([1]));
    let error = alpha["error"].as_str().unwrap_or_default();
    assert!(error.contains("reads manifest format 1 only"), "{alpha}");
    fs::write(&hb, saved).unwrap();

    // One common file changes: one new pack of its directory, and the host reads only
    // that file out of it.
    let before = objects(&sshd.host_dir("alpha"));
    let m060_before = fs::read(sshd.fleet().join("common/mods/m060.nix")).unwrap();
    fs::write(
        sshd.fleet().join("common/mods/m060.nix"),
        "{ changed = true; }\n",
    )
    .unwrap();
    crate::agent::write_version(&sshd, "2");
    sshd.publish();
    let after = objects(&sshd.host_dir("alpha"));
    let new: Vec<&String> = after.difference(&before).collect();
    assert!(
        new.len() <= 8,
        "new trees (root, common, mods, …) and the two changed files' packs: {new:?}"
    );
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(m.profile_target().unwrap().contains("nixos-system-alpha-2"));
    let changed = Digest::of(b"{ changed = true; }\n").to_hex();
    assert!(m.base.join("state/objects").join(&changed).exists());
    // Exactly the two changed files' ranges (m060.nix and version.nix, each alone in what
    // it lacks of its pack), not the rest of common/mods' packs.
    let expected = "{ changed = true; }\n".len() + "{ version = \"2\"; }\n".len();
    assert!(
        text(&out).contains(&format!("fetched {expected} B")),
        "{}",
        text(&out)
    );

    // A rollback over format 2: the kept version before is read whole from its trees and
    // made live again, and the host goes back to its system. It kept only the files of the
    // version it applied, so it reads the two old files' ranges again, and nothing more.
    let out = crate::common::bento()
        .args(["rollback", "alpha", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(live_manifest(&sshd, "alpha").format, FORMAT_TREES);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(m.profile_target().unwrap().contains("nixos-system-alpha-1"));
    let expected = m060_before.len() + "{ version = \"1\"; }\n".len();
    assert!(
        text(&out).contains(&format!("fetched {expected} B")),
        "{}",
        text(&out)
    );
}

/// Every object file in the host's directory that parses as a tree with a pack.
fn a_pack(dir: &Path) -> (String, Vec<u8>) {
    for name in objects(dir) {
        let bytes = fs::read(dir.join("objects").join(&name)).unwrap();
        if let Ok(tree) = serde_json::from_slice::<bento::protocol::tree::Tree>(&bytes) {
            if let Some(p) = tree.packs.first() {
                let pack = p.to_hex();
                return (
                    pack.clone(),
                    fs::read(dir.join("objects").join(pack)).unwrap(),
                );
            }
        }
    }
    panic!("no pack in {}", dir.display())
}

#[test]
fn a_tampered_pack_entry_or_tree_is_refused_and_a_cut_pack_download_resumes() {
    let sshd = Sshd::start(&["alpha"]);
    write_modules(&sshd, 60, 1000);
    set_format_2(&sshd);
    fleet(&sshd);
    let dir = sshd.host_dir("alpha");
    let m = Machine::new(&sshd, "alpha", "");

    // A pack entry flipped on the server: refused, nothing applied; put back, it applies.
    let (pack, good) = a_pack(&dir);
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 1;
    let path = dir.join("objects").join(&pack);
    // The chroot's object is a hard link to the pool: write through it, as an attacker would.
    fs::write(&path, &bad).unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    assert!(text(&out).contains("hashes to"), "{}", text(&out));
    assert!(m.activations().is_empty());
    fs::write(&path, &good).unwrap();

    // A tree replaced by another tree's bytes: refused by its digest (the host holds no
    // copy of its own, as on its first update). The root is in the manifest: a subtree.
    let _ = fs::remove_dir_all(m.base.join("state/objects"));
    let root = live_manifest(&sshd, "alpha")
        .tree
        .unwrap()
        .top
        .entries
        .iter()
        .find_map(|e| match e.node {
            bento::protocol::tree::Node::Tree { sha256 } => Some(sha256),
            _ => None,
        })
        .expect("alpha has a subdirectory");
    let root_path = dir.join("objects").join(root.to_hex());
    let root_bytes = fs::read(&root_path).unwrap();
    fs::write(&root_path, b"{\"format\":2,\"entries\":[]}\n").unwrap();
    let out = m.update_with(&[], &["--force"]);
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    assert!(text(&out).contains(&root.to_hex()), "{}", text(&out));
    assert!(m.activations().is_empty());
    fs::write(&root_path, &root_bytes).unwrap();

    // The download cut in the middle of the packs: the next run resumes the ranges it
    // started (a partial range file is left) and applies.
    let relay = Relay::start(sshd.port);
    let m = m.via(relay.port);
    let _ = fs::remove_dir_all(m.base.join("state/objects"));
    relay.reset();
    relay.cut_after(Cut {
        conn: 0,
        dir: Dir::Down,
        bytes: 40_000,
    });
    let out = m.update_with(&[], &["--force"]);
    assert!(
        relay.cut_fired(),
        "{:?}\n{}",
        relay.connections(),
        text(&out)
    );
    assert_ne!(
        code(&out),
        EXIT_UPDATED,
        "{:?}\n{}",
        relay.connections(),
        text(&out)
    );
    let partial: Vec<String> = fs::read_dir(m.base.join("state/objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".partial-"))
        .collect();
    assert!(!partial.is_empty(), "a range was left to resume");
    relay.reset();
    let out = m.update_with(&[], &["--force"]);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
}

/// A format-2 version exported for a mirror (`publish --export`: trees and packs, not
/// files) is taken from the mirror over HTTPS while the server is down: the trees whole,
/// the packed files as `Range` reads of their packs.
#[test]
fn a_mirror_serves_format_2_by_ranges_while_the_server_is_down() {
    let sshd = Sshd::start(&["alpha"]);
    write_modules(&sshd, 40, 1000);
    set_format_2(&sshd);
    fleet(&sshd);
    let relay = Relay::start(sshd.port);
    let m = Machine::new(&sshd, "alpha", "").via(relay.port);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));

    let export = sshd.dir.join("export");
    fs::write(
        sshd.fleet().join("common/mods/m007.nix"),
        "{ mirrored = 1; }\n",
    )
    .unwrap();
    crate::agent::write_version(&sshd, "2");
    crate::mirrors::publish_export(&sshd, &export);
    let web = crate::mirrors::serve_tls(&sshd, &export, &m);
    relay.set_down(true);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(m.profile_target().unwrap().contains("nixos-system-alpha-2"));
    let changed = Digest::of(b"{ mirrored = 1; }\n").to_hex();
    assert!(m.base.join("state/objects").join(&changed).exists());
    let asked = web.requests();
    // Whole objects read from the mirror are the new trees below the root (the root comes
    // in the manifest); the packed files come as closed byte ranges of their packs.
    let root = live_manifest(&sshd, "alpha").tree.unwrap().root.to_hex();
    let whole: Vec<&str> = asked
        .iter()
        .filter_map(|r| r.strip_prefix("GET /alpha/objects/"))
        .filter(|o| !o.contains(' '))
        .collect();
    assert!(!whole.contains(&root.as_str()), "{asked:?}");
    for o in &whole {
        let bytes = fs::read(export.join("alpha/objects").join(o)).unwrap();
        assert!(
            serde_json::from_slice::<bento::protocol::tree::Tree>(&bytes).is_ok(),
            "{o} read whole is not a tree: {asked:?}"
        );
    }
    let ranged = asked
        .iter()
        .filter(|r| r.starts_with("GET /alpha/objects/") && r.contains(" bytes="))
        .filter(|r| !r.ends_with('-'))
        .count();
    assert!(ranged >= 2, "m007.nix and version.nix by range: {asked:?}");
}
