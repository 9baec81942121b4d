//! Fetching a format-2 version (issue #26): its trees, level by level (each level one
//! batch of reads, trees already held locally not read again), then the small files it
//! lacks as ranges of their packs, neighbours read together. Invariants: a tree is kept
//! only once it hashes to the digest its parent (or the signed manifest) names; a file out
//! of a pack lands in `objects/<digest>` only once its bytes hash to the digest its tree
//! names; an interrupted range stays in `objects/.partial-…` and resumes where it stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::fetch::partial_name;
use super::source::{Item, ObjectPart, RemoteError, Source};
use crate::protocol::manifest::{Digest, Manifest};
use crate::protocol::pack::PackIndex;
use crate::protocol::tree::{Node, Tree, TreeError, MAX_DEPTH, MAX_ENTRIES, MAX_TREE_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum PackedError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The server's content is wrong (a tree or a pack entry fails its digest): a refusal.
    #[error("{0}")]
    Refused(String),
}

fn local(path: &Path) -> impl FnOnce(std::io::Error) -> RemoteError + '_ {
    move |source| RemoteError::Local {
        path: path.to_owned(),
        source,
    }
}

/// Reads the trees of a format-2 manifest (from `objects` when held, else from `src`, then
/// kept there) and expands it; nothing to do for format 1. Returns the bytes fetched.
pub fn expand(
    src: &mut dyn Source,
    manifest: &mut Manifest,
    objects: &Path,
) -> Result<u64, PackedError> {
    let Some((root, top)) = manifest.tree.as_ref().map(|t| (t.root, t.top.clone())) else {
        return Ok(0);
    };
    if manifest.is_expanded() {
        return Ok(0);
    }
    let refused = |e: TreeError| PackedError::Refused(e.to_string());
    let mut fetched = 0u64;
    let mut seen: BTreeSet<Digest> = BTreeSet::new();
    // Every tree read, checked once here and handed to the expansion from memory.
    let mut held: BTreeMap<Digest, Vec<u8>> = BTreeMap::new();
    let mut level = vec![root];
    for _ in 0..=MAX_DEPTH {
        if level.is_empty() {
            break;
        }
        let mut trees = Vec::new();
        let mut absent = Vec::new();
        for d in level {
            // The root came in the (verified) manifest.
            if d == root {
                trees.push((*top).clone());
                continue;
            }
            // A tree held locally is checked again: the state directory is no authority,
            // and a damaged copy is fetched afresh rather than failing every run.
            let path = objects.join(d.to_hex());
            match std::fs::read(&path)
                .ok()
                .map(|b| (Tree::parse_untrusted(&b, &d), b))
            {
                Some((Ok(tree), bytes)) => {
                    trees.push(tree);
                    held.insert(d, bytes);
                }
                Some((Err(_), _)) => {
                    let _ = std::fs::remove_file(&path);
                    absent.push(d);
                }
                None => absent.push(d),
            }
        }
        let items: Vec<Item> = absent.iter().map(|d| Item::Object(*d)).collect();
        for (d, bytes) in absent.iter().zip(src.read_many(&items, MAX_TREE_BYTES)?) {
            let bytes = bytes.ok_or_else(|| RemoteError::NotFound {
                path: Item::Object(*d).path(),
            })?;
            fetched += bytes.len() as u64;
            trees.push(Tree::parse_untrusted(&bytes, d).map_err(refused)?);
            let path = objects.join(d.to_hex());
            crate::sys::atomic::write_file(&path, &bytes, 0o600).map_err(local(&path))?;
            held.insert(*d, bytes);
        }
        level = Vec::new();
        for tree in trees {
            for e in tree.entries {
                if let Node::Tree { sha256 } = e.node {
                    if seen.insert(sha256) {
                        level.push(sha256);
                    }
                }
            }
        }
        if seen.len() > MAX_ENTRIES {
            return Err(refused(TreeError::TooManyEntries { root }));
        }
    }
    // Every tree is held now (or the depth bound stops the expansion with its error).
    manifest
        .expand(|d| {
            held.get(d).cloned().ok_or_else(|| TreeError::Missing {
                tree: *d,
                reason: format!("deeper than {MAX_DEPTH} levels"),
            })
        })
        .map_err(|e| PackedError::Refused(e.to_string()))?;
    Ok(fetched)
}

/// The name of the partial download of one range of a pack.
fn range_name(pack: &Digest, range: &std::ops::Range<u64>) -> String {
    partial_name(pack) + &format!("-{}-{}", range.start, range.end)
}

/// Downloads the `wanted` files the expanded format-2 `manifest` packs, as ranges of their
/// packs, into `objects/<digest>`, each verified. Returns the files it leaves to fetch
/// whole (not packed) and the bytes fetched.
pub fn fetch_packed(
    src: &mut dyn Source,
    manifest: &Manifest,
    wanted: &[(Digest, u64)],
    objects: &Path,
) -> Result<(Vec<(Digest, u64)>, u64), PackedError> {
    let Some(stored) = manifest.stored() else {
        return Ok((wanted.to_vec(), 0));
    };
    let packed = stored.packed();
    let mut whole = Vec::new();
    let mut by_pack: BTreeMap<Digest, (&PackIndex, Vec<Digest>)> = BTreeMap::new();
    for (d, size) in wanted {
        match packed.get(d) {
            Some(index) => by_pack
                .entry(index.pack)
                .or_insert_with(|| (index, Vec::new()))
                .1
                .push(*d),
            None => whole.push((*d, *size)),
        }
    }
    let mut parts = Vec::new();
    let mut reads: Vec<(&PackIndex, std::ops::Range<u64>, Vec<Digest>)> = Vec::new();
    for (pack, (index, files)) in &by_pack {
        for range in index.ranges(files.iter()) {
            let inside: Vec<Digest> = files
                .iter()
                .filter(|d| {
                    index
                        .find(d)
                        .is_some_and(|e| e.offset >= range.start && e.offset + e.size <= range.end)
                })
                .copied()
                .collect();
            let dest = objects.join(range_name(pack, &range));
            let have = match std::fs::metadata(&dest) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(local(&dest)(e).into()),
            };
            let len = range.end - range.start;
            if have < len {
                parts.push(ObjectPart {
                    item: Item::Object(*pack),
                    from: range.start + have,
                    max: len - have,
                    dest,
                });
            }
            reads.push((index, range, inside));
        }
    }
    let fetched = src.read_objects(&parts)?;
    for (index, range, inside) in reads {
        let path = objects.join(range_name(&index.pack, &range));
        // Empty files make empty ranges: nothing was read, nothing is on disk.
        let bytes = match range.is_empty() {
            true => Vec::new(),
            false => std::fs::read(&path).map_err(local(&path))?,
        };
        for d in inside {
            let entry = match index.verify(&d, range.start, &bytes) {
                Ok(entry) => entry,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(PackedError::Refused(e.to_string()));
                }
            };
            let dest = objects.join(d.to_hex());
            crate::sys::atomic::write_file(&dest, entry, 0o600).map_err(local(&dest))?;
        }
        if !range.is_empty() {
            std::fs::remove_file(&path).map_err(local(&path))?;
        }
    }
    Ok((whole, fetched))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::source::DirConnection;
    use super::*;
    use crate::protocol::layout;
    use crate::protocol::manifest::{Build, ConfigEntry, RelPath, FORMAT};
    use crate::protocol::HostName;

    /// A served host directory holding a format-2 version of `files`, and the manifest as a
    /// host reads it (trees unread).
    fn served(files: &[(String, Vec<u8>)]) -> (tempfile::TempDir, Manifest) {
        let t = tempfile::tempdir().unwrap();
        for d in [layout::MANIFESTS, layout::OBJECTS, layout::LOGS] {
            std::fs::create_dir(t.path().join(d)).unwrap();
        }
        let mut contents = BTreeMap::new();
        let mut config = vec![ConfigEntry::Directory {
            path: RelPath::new("d").unwrap(),
        }];
        for (path, bytes) in files {
            let sha256 = Digest::of(bytes);
            contents.insert(sha256, bytes.clone());
            config.push(ConfigEntry::File {
                path: RelPath::new(path).unwrap(),
                size: bytes.len() as u64,
                sha256,
                executable: false,
            });
        }
        let mut m = Manifest {
            format: FORMAT,
            host: HostName::new("alpha").unwrap(),
            created: "2026-12-06T12:00:00Z".parse().unwrap(),
            serial: 1,
            source_commit: None,
            dirty: false,
            build: Build::Flake,
            system: None,
            config,
            tree: None,
            files: vec![],
        };
        m.canonicalize();
        let object = |d: &Digest, bytes: &[u8]| {
            std::fs::write(t.path().join(layout::OBJECTS).join(d.to_hex()), bytes).unwrap()
        };
        m.store_as_trees(
            |chunk| {
                let mut pack = crate::protocol::pack::PackWriter::default();
                for (d, _) in chunk {
                    pack.add(&contents[d]);
                }
                let (bytes, index) = pack.finish();
                object(&index.pack, &bytes);
                Ok::<_, std::convert::Infallible>(index.pack)
            },
            &Default::default(),
        )
        .unwrap();
        for (d, bytes) in &m.stored().unwrap().trees {
            object(d, bytes);
        }
        for (d, bytes) in &contents {
            if bytes.len() as u64 > crate::protocol::pack::PACKED_MAX {
                object(d, bytes);
            }
        }
        let read = Manifest::parse(&m.to_bytes()).unwrap();
        (t, read)
    }

    /// The tree of `d/`, the served version's one subtree (its root is in the manifest).
    fn subtree(m: &Manifest) -> Digest {
        match m.tree.as_ref().unwrap().top.entries[..] {
            [crate::protocol::tree::Entry {
                node: Node::Tree { sha256 },
                ..
            }] => sha256,
            ref other => panic!("one subtree: {other:?}"),
        }
    }

    fn files(n: usize) -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| {
                (
                    format!("d/f{i:03}"),
                    format!("file {i}\n").repeat(20).into_bytes(),
                )
            })
            .collect()
    }

    fn update(
        t: &tempfile::TempDir,
        m: &Manifest,
        objects: &Path,
    ) -> Result<Manifest, PackedError> {
        let mut src = DirConnection::open(t.path()).unwrap();
        let mut m = m.clone();
        expand(&mut src, &mut m, objects)?;
        let wanted: Vec<(Digest, u64)> = m
            .config
            .iter()
            .filter_map(|e| match e {
                ConfigEntry::File { sha256, size, .. } => Some((*sha256, *size)),
                _ => None,
            })
            .filter(|(d, _)| !objects.join(d.to_hex()).exists())
            .collect();
        let (whole, _) = fetch_packed(&mut src, &m, &wanted, objects)?;
        crate::agent::fetch::objects(&mut src, &whole, objects)?;
        Ok(m)
    }

    #[test]
    fn a_version_is_fetched_from_trees_and_pack_ranges_and_each_file_is_whole() {
        let mut all = files(40);
        all.push(("d/big".into(), vec![7u8; 70 * 1024]));
        let (t, m) = served(&all);
        let local = tempfile::tempdir().unwrap();
        let m = update(&t, &m, local.path()).unwrap();
        for (_, bytes) in &all {
            let d = Digest::of(bytes);
            assert_eq!(
                &std::fs::read(local.path().join(d.to_hex())).unwrap(),
                bytes
            );
        }
        assert!(m.is_expanded());
        let left: Vec<_> = std::fs::read_dir(local.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".partial"))
            .collect();
        assert!(left.is_empty(), "no partial range is left: {left:?}");
    }

    #[test]
    fn a_tampered_pack_entry_or_tree_is_refused_and_nothing_of_it_is_kept() {
        let all = files(30);
        let (t, m) = served(&all);
        let objects = t.path().join(layout::OBJECTS);
        let local = tempfile::tempdir().unwrap();
        let mut expanded = m.clone();
        expand(
            &mut DirConnection::open(t.path()).unwrap(),
            &mut expanded,
            local.path(),
        )
        .unwrap();
        let pack = *expanded.stored().unwrap().packs.keys().next().unwrap();
        let mut bytes = std::fs::read(objects.join(pack.to_hex())).unwrap();
        bytes[3] ^= 1;
        std::fs::write(objects.join(pack.to_hex()), &bytes).unwrap();
        let err = update(&t, &m, local.path()).unwrap_err();
        assert!(matches!(err, PackedError::Refused(_)), "{err}");
        let tampered = expanded.stored().unwrap().packs[&pack]
            .entries
            .iter()
            .find(|e| e.offset <= 3 && 3 < e.offset + e.size)
            .unwrap()
            .sha256;
        assert!(!local.path().join(tampered.to_hex()).exists());

        // A tree swapped on the server, with nothing held locally: refused by its digest.
        let root = subtree(&m);
        std::fs::write(
            objects.join(root.to_hex()),
            b"{\"format\":2,\"entries\":[]}\n",
        )
        .unwrap();
        let fresh = tempfile::tempdir().unwrap();
        let err = update(&t, &m, fresh.path()).unwrap_err().to_string();
        assert!(err.contains(&root.to_hex()), "{err}");
    }

    #[test]
    fn a_damaged_tree_in_the_state_directory_is_fetched_again() {
        let all = files(10);
        let (t, m) = served(&all);
        let local = tempfile::tempdir().unwrap();
        update(&t, &m, local.path()).unwrap();
        let held = local.path().join(subtree(&m).to_hex());
        let good = std::fs::read(&held).unwrap();
        std::fs::write(&held, b"damaged").unwrap();
        let again = update(&t, &m, local.path()).unwrap();
        assert!(again.is_expanded());
        assert_eq!(
            std::fs::read(&held).unwrap(),
            good,
            "replaced by the served tree"
        );
    }

    #[test]
    fn a_range_cut_short_resumes_where_it_stopped() {
        let all = files(30);
        let (t, m) = served(&all);
        let local = tempfile::tempdir().unwrap();
        let mut expanded = m.clone();
        expand(
            &mut DirConnection::open(t.path()).unwrap(),
            &mut expanded,
            local.path(),
        )
        .unwrap();
        // What an interrupted run leaves: the first half of one pack's range.
        let index = expanded
            .stored()
            .unwrap()
            .packs
            .values()
            .next()
            .unwrap()
            .clone();
        let wanted: Vec<Digest> = index.entries.iter().map(|e| e.sha256).collect();
        let range = index.ranges(wanted.iter())[0].clone();
        let pack = std::fs::read(t.path().join(layout::OBJECTS).join(index.pack.to_hex())).unwrap();
        let half = (range.start + (range.end - range.start) / 2) as usize;
        std::fs::write(
            local.path().join(range_name(&index.pack, &range)),
            &pack[range.start as usize..half],
        )
        .unwrap();
        // The server's copy of that first half is gone: only the resumed tail can be read.
        let mut damaged = pack.clone();
        for b in &mut damaged[range.start as usize..half] {
            *b = b'?';
        }
        std::fs::write(
            t.path().join(layout::OBJECTS).join(index.pack.to_hex()),
            &damaged,
        )
        .unwrap();
        update(&t, &m, local.path()).unwrap();
        for d in wanted {
            assert!(local.path().join(d.to_hex()).exists(), "{d:?} landed whole");
        }
    }
}
