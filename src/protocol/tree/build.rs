//! Building a listing's trees on the publisher. A thousand hosts sharing `common/` each list
//! its files, and each would build the same trees from them: [`Subtrees`] lets all but the
//! first find them instead. Invariant: a subtree found is exactly the one building would
//! make, because it is found only by what its trees are a function of (its content key, or
//! the very entries below it).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use super::{chunks, Entry, Node, Tree, Trees, TREE_FORMAT};
use crate::protocol::listing::{ConfigEntry, Digest, RelPath};
use crate::protocol::pack::PackIndex;

/// A subtree's digest and its trees and packs.
type Built = (Digest, Arc<Trees>);

/// Most listings remembered for one top-level path: hosts that each have their own
/// directory of that name would otherwise compare against every other host's.
const LISTINGS_PER_PATH: usize = 4;

/// Subtrees already built in this run, found two ways:
/// - by content key: a subtree's key hashes its names, file digests, sizes and modes and its
///   subdirectories' keys, so equal keys are equal content (and so equal trees), wherever
///   the subtree is;
/// - by listing: a directory at the top of a host's tree whose entries below it are exactly
///   those an earlier host had there (the same `common/`), found by comparing the entries,
///   before any map of them is made or hashed.
#[derive(Default)]
pub struct Subtrees {
    pub(super) by_key: Mutex<BTreeMap<Digest, Built>>,
    pub(super) by_listing: Mutex<HashMap<RelPath, Vec<Listed>>>,
}

/// The entries below one top-level directory (full paths), and what they built.
#[derive(Clone)]
pub(super) struct Listed {
    below: Arc<[ConfigEntry]>,
    built: Built,
}

impl Subtrees {
    fn listed(&self, dir: &RelPath, below: &[ConfigEntry]) -> Option<Built> {
        let candidates = self
            .by_listing
            .lock()
            .expect("subtrees")
            .get(dir)
            .cloned()?;
        candidates
            .into_iter()
            .find(|l| *l.below == *below)
            .map(|l| l.built)
    }

    fn remember_listing(&self, dir: &RelPath, below: &[ConfigEntry], built: &Built) {
        let mut all = self.by_listing.lock().expect("subtrees");
        let known = all.entry(dir.clone()).or_default();
        if known.len() < LISTINGS_PER_PATH && !known.iter().any(|l| *l.below == *below) {
            known.push(Listed {
                below: below.into(),
                built: built.clone(),
            });
        }
    }
}

/// One directory being built. Names borrow the listing's paths: most directories are shared
/// subtrees found in the memo, whose names are never copied (every file of every host passes
/// through here).
#[derive(Default)]
struct Dir<'e> {
    files: BTreeMap<&'e str, Node>,
    dirs: BTreeMap<&'e str, Dir<'e>>,
    /// Its key, once worked out: a parent's key is made of its subdirectories'.
    key: std::cell::OnceCell<Digest>,
    /// Found already built (its trees are in the output): its digest.
    found: Option<Digest>,
}

impl<'e> Dir<'e> {
    fn found(digest: Digest) -> Self {
        Dir {
            found: Some(digest),
            ..Dir::default()
        }
    }

    fn child<'a>(&'a mut self, name: &'e str) -> &'a mut Dir<'e> {
        self.dirs.entry(name).or_default()
    }

    fn at<'a>(&'a mut self, path: &'e str) -> &'a mut Dir<'e> {
        path.split('/').fold(self, Dir::child)
    }

    /// Its content key. Never asked of a directory found by its listing (those are the
    /// root's, and the root has no key: it is the host's own).
    fn key(&self) -> Digest {
        debug_assert!(self.found.is_none(), "a found directory has no key");
        *self.key.get_or_init(|| self.key_of())
    }

    fn key_of(&self) -> Digest {
        let mut h = Sha256::new();
        for (name, node) in &self.files {
            if let Node::File {
                size,
                sha256,
                executable,
            } = node
            {
                h.update(b"F");
                h.update(name.as_bytes());
                h.update([0]);
                h.update(sha256.as_bytes());
                h.update(size.to_le_bytes());
                h.update([u8::from(*executable)]);
            }
        }
        for (name, sub) in &self.dirs {
            h.update(b"D");
            h.update(name.as_bytes());
            h.update([0]);
            h.update(sub.key().as_bytes());
        }
        Digest::from_bytes(h.finalize().into())
    }
}

type PackOf<'a, E> = dyn FnMut(&[(Digest, u64)]) -> Result<Digest, E> + 'a;

/// Builds the trees of a format-1 listing (directories and files by path). The listing must
/// be what `Manifest::parse` accepts: each parent listed, no duplicates. `pack_of` names the
/// pack of one chunk's files (the publisher hashes their concatenation, or remembers it).
/// Every subtree below the root is reused from `memo`, or built and remembered there.
/// Returns the root tree too, as built (the manifest carries it).
pub fn build<E>(
    entries: &[ConfigEntry],
    mut pack_of: impl FnMut(&[(Digest, u64)]) -> Result<Digest, E>,
    memo: &Subtrees,
) -> Result<(Trees, Tree), E> {
    let mut out = no_trees();
    let mut root = Dir::default();
    // Top-level directories found by their listing: their entries are skipped below.
    let mut found: Vec<Range<usize>> = Vec::new();
    let mut to_remember: Vec<(&RelPath, Range<usize>)> = Vec::new();
    if entries.is_sorted_by(|a, b| a.path() < b.path()) {
        for e in entries {
            let ConfigEntry::Directory { path } = e else {
                continue;
            };
            if path.as_str().contains('/') {
                continue;
            }
            let range = below(entries, path);
            if range.is_empty() {
                continue;
            }
            match memo.listed(path, &entries[range.clone()]) {
                Some((digest, trees)) => {
                    merge(&mut out, &trees);
                    root.dirs.insert(path.as_str(), Dir::found(digest));
                    found.push(range);
                }
                None => to_remember.push((path, range)),
            }
        }
    }
    let mut skips = found.iter().peekable();
    let mut i = 0;
    while let Some(e) = entries.get(i) {
        if let Some(r) = skips.next_if(|r| r.start == i) {
            i = r.end;
            continue;
        }
        i += 1;
        let (parent, name) = split(e.path());
        let dir = match parent {
            Some(p) => root.at(p),
            None => &mut root,
        };
        match e {
            ConfigEntry::Directory { .. } => {
                dir.child(name);
            }
            ConfigEntry::File {
                size,
                sha256,
                executable,
                ..
            } => {
                dir.files.insert(
                    name,
                    Node::File {
                        size: *size,
                        sha256: *sha256,
                        executable: *executable,
                    },
                );
            }
        }
    }
    for (path, range) in to_remember {
        let name = path.as_str();
        let Some(dir) = root.dirs.remove(name) else {
            continue;
        };
        let built = emit_shared(dir, &mut out, &mut pack_of, memo)?;
        memo.remember_listing(path, &entries[range], &built);
        root.dirs.insert(name, Dir::found(built.0));
    }
    // The root is the host's own: built, not remembered.
    let (digest, top) = emit(root, &mut out, &mut pack_of, memo)?;
    out.root = digest;
    Ok((out, top))
}

/// Where the entries below the top-level directory `dir` are in a listing sorted by path:
/// the paths that start with `dir/`, which sort together.
fn below(entries: &[ConfigEntry], dir: &RelPath) -> Range<usize> {
    let prefix = format!("{dir}/");
    let start = entries.partition_point(|e| e.path().as_str() < prefix.as_str());
    let len = entries[start..].partition_point(|e| e.path().as_str().starts_with(&prefix));
    start..start + len
}

fn split(path: &RelPath) -> (Option<&str>, &str) {
    match path.as_str().rsplit_once('/') {
        Some((parent, name)) => (Some(parent), name),
        None => (None, path.as_str()),
    }
}

fn merge(out: &mut Trees, sub: &Trees) {
    for (d, bytes) in &sub.trees {
        out.trees.entry(*d).or_insert_with(|| bytes.clone());
    }
    for index in sub.packs.values() {
        out.add_pack(Arc::clone(index));
    }
}

fn no_trees() -> Trees {
    Trees {
        root: Digest::of(b""),
        trees: BTreeMap::new(),
        packs: BTreeMap::new(),
    }
}

/// A subdirectory's trees, from `memo` or built (and remembered), merged into `out`.
fn emit_shared<E>(
    dir: Dir<'_>,
    out: &mut Trees,
    pack_of: &mut PackOf<'_, E>,
    memo: &Subtrees,
) -> Result<Built, E> {
    let k = dir.key();
    if let Some(built) = memo.by_key.lock().expect("subtrees").get(&k).cloned() {
        merge(out, &built.1);
        return Ok(built);
    }
    let mut sub = no_trees();
    let (digest, _) = emit(dir, &mut sub, pack_of, memo)?;
    sub.root = digest;
    merge(out, &sub);
    let built = (digest, Arc::new(sub));
    memo.by_key
        .lock()
        .expect("subtrees")
        .insert(k, built.clone());
    Ok(built)
}

/// The tree of `dir` into `out` with its subtrees and packs; its digest, and the tree
/// itself (the root's travels in the manifest).
fn emit<E>(
    dir: Dir<'_>,
    out: &mut Trees,
    pack_of: &mut PackOf<'_, E>,
    memo: &Subtrees,
) -> Result<(Digest, Tree), E> {
    let mut entries: Vec<Entry> = dir
        .files
        .into_iter()
        .map(|(name, node)| Entry {
            name: name.to_owned(),
            node,
        })
        .collect();
    for (name, sub) in dir.dirs {
        let sha256 = match sub.found {
            Some(digest) => digest,
            None => emit_shared(sub, out, pack_of, memo)?.0,
        };
        entries.push(Entry {
            name: name.to_owned(),
            node: Node::Tree { sha256 },
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut packs = Vec::new();
    for files in chunks(&entries) {
        let pack = pack_of(&files)?;
        out.add_pack(Arc::new(PackIndex::layout(pack, &files)));
        packs.push(pack);
    }
    let tree = Tree {
        format: TREE_FORMAT,
        entries,
        packs,
    };
    let bytes = tree.to_bytes();
    let digest = Digest::of(&bytes);
    out.trees.insert(digest, bytes.into());
    Ok((digest, tree))
}
