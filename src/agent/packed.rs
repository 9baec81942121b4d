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
    let Some(root) = manifest.tree.as_ref().map(|t| t.root) else {
        return Ok(0);
    };
    if manifest.is_expanded() {
        return Ok(0);
    }
    let mut fetched = 0u64;
    let mut seen: BTreeSet<Digest> = BTreeSet::new();
    let mut level = vec![root];
    for _ in 0..=MAX_DEPTH {
        if level.is_empty() {
            break;
        }
        let absent: Vec<Digest> = level
            .iter()
            .filter(|d| !objects.join(d.to_hex()).exists())
            .copied()
            .collect();
        let items: Vec<Item> = absent.iter().map(|d| Item::Object(*d)).collect();
        for (d, bytes) in absent.iter().zip(src.read_many(&items, MAX_TREE_BYTES)?) {
            let bytes = bytes.ok_or_else(|| RemoteError::NotFound {
                path: Item::Object(*d).path(),
            })?;
            fetched += bytes.len() as u64;
            Tree::parse_untrusted(&bytes, d).map_err(|e| PackedError::Refused(e.to_string()))?;
            let path = objects.join(d.to_hex());
            crate::sys::atomic::write_file(&path, &bytes, 0o600).map_err(local(&path))?;
        }
        let mut next = Vec::new();
        for d in &level {
            let path = objects.join(d.to_hex());
            let bytes = std::fs::read(&path).map_err(local(&path))?;
            // A tree held locally is checked again: the state directory is no authority.
            let tree = Tree::parse_untrusted(&bytes, d)
                .map_err(|e| PackedError::Refused(e.to_string()))?;
            for e in tree.entries {
                if let Node::Tree { sha256 } = e.node {
                    if seen.insert(sha256) {
                        next.push(sha256);
                    }
                }
            }
            if seen.len() > MAX_ENTRIES {
                return Err(PackedError::Refused(
                    TreeError::TooManyEntries { root }.to_string(),
                ));
            }
        }
        level = next;
    }
    // Every tree is local now (or the depth bound stops the expansion with its error).
    manifest
        .expand(|d| {
            let path = objects.join(d.to_hex());
            std::fs::read(&path).map_err(|e| TreeError::Missing {
                tree: *d,
                reason: format!("{}: {e}", path.display()),
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
