//! Manifest format 2's trees (issue #26): one directory's listing is an object of its own,
//! named like every object by the sha256 of its canonical bytes, so a subtree many hosts share
//! (`common/`) is one object they all name and one change to it is one new tree, not a new
//! file list per host. A tree's small files are stored in packs ([`chunks`] of them, cut
//! where a file's *name* says, so a changed file rewrites one pack, not the directory's),
//! and the tree names its packs. Invariant: a tree's digest fixes every byte below it
//! (entries name files and subtrees by digest, packs are laid out by the entries), every tree
//! has exactly one byte form (`parse_untrusted` refuses any other), and expanding a tree from
//! an untrusted source is bounded in depth and in entries, so a hostile graph of shared
//! subtrees cannot exhaust a host.

use std::collections::btree_map::Entry as Slot;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::protocol::listing::{ConfigEntry, Digest, RelPath, MAX_OBJECT_BYTES};
use crate::protocol::pack::{PackIndex, PACKED_MAX};

mod build;
mod entry;

pub use build::{build, Subtrees};

/// What `format` a tree object says it is.
pub const TREE_FORMAT: u32 = 2;
/// A tree object larger than this is refused unread.
pub const MAX_TREE_BYTES: u64 = 16 * 1024 * 1024;
/// Deepest nesting a host expands (a configuration tree is rarely ten deep).
pub const MAX_DEPTH: usize = 64;
/// Most entries a host expands from one root, counting a shared subtree once per place it
/// appears: what bounds a graph that names one subtree from many places.
pub const MAX_ENTRIES: usize = 200_000;
/// Most files in one pack (at most this many times `PACKED_MAX` bytes).
pub const CHUNK_MAX: usize = 64;
/// A file whose name hashes below this (first byte) ends its pack: one name in 16, so a
/// pack holds about 16 files and where packs are cut does not move when content changes.
const CUT_BELOW: u8 = 16;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("tree {digest} is {size} bytes, more than the {MAX_TREE_BYTES}-byte limit")]
    TooLarge { digest: Digest, size: u64 },
    #[error("tree {expected}: its content hashes to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("tree {digest} is not valid: {reason}")]
    Invalid { digest: Digest, reason: String },
    #[error("tree {digest} is not in canonical form (entries sorted by name, compact JSON, one newline)")]
    NotCanonical { digest: Digest },
    #[error("tree below {path:?} is more than {MAX_DEPTH} levels deep")]
    TooDeep { path: String },
    #[error("tree {root} expands to more than {MAX_ENTRIES} entries")]
    TooManyEntries { root: Digest },
    #[error("tree {tree} is not available: {reason}")]
    Missing { tree: Digest, reason: String },
}

/// What one name in a directory is (on the wire, inside its entry: `entry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File {
        size: u64,
        sha256: Digest,
        executable: bool,
    },
    /// A subdirectory: the digest of its own tree object.
    Tree { sha256: Digest },
}

/// One name of a directory and what it is (its wire form: `entry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// One path component.
    pub name: String,
    pub node: Node,
}

/// One directory's listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tree {
    pub format: u32,
    pub entries: Vec<Entry>,
    /// The pack of each of [`chunks`]`(entries)`, in order (absent when there is none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<Digest>,
}

/// A name is one safe path component, the rule `RelPath` keeps for each of its parts.
fn valid_name(name: &str) -> bool {
    !name.contains('/') && name.len() <= 255 && RelPath::new(name).is_ok()
}

/// The packs' contents of a directory: its files of at most `PACKED_MAX` bytes, in name
/// order, as (digest, size), cut after a name that hashes below `CUT_BELOW` or at
/// `CHUNK_MAX` files. Names alone decide the cuts, so editing a file changes its own pack
/// only, and hosts sharing a directory share its packs.
pub fn chunks(entries: &[Entry]) -> Vec<Vec<(Digest, u64)>> {
    let mut out: Vec<Vec<(Digest, u64)>> = Vec::new();
    let mut open: Vec<(Digest, u64)> = Vec::new();
    for e in entries {
        let Node::File { size, sha256, .. } = e.node else {
            continue;
        };
        if size > PACKED_MAX {
            continue;
        }
        open.push((sha256, size));
        if Sha256::digest(e.name.as_bytes())[0] < CUT_BELOW || open.len() == CHUNK_MAX {
            out.push(std::mem::take(&mut open));
        }
    }
    if !open.is_empty() {
        out.push(open);
    }
    out
}

impl Tree {
    /// The canonical bytes: what is stored as `objects/<digest>`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).expect("tree serialises");
        out.push(b'\n');
        out
    }

    /// Where each packed file lies: one index per pack, in the order of `packs`.
    pub fn pack_indexes(&self) -> Vec<PackIndex> {
        self.packs
            .iter()
            .zip(chunks(&self.entries))
            .map(|(pack, files)| PackIndex::layout(*pack, &files))
            .collect()
    }

    /// Parses bytes from an untrusted source: size, digest, names, order, one pack per
    /// chunk and the one byte form.
    pub fn parse_untrusted(bytes: &[u8], expected: &Digest) -> Result<Tree, TreeError> {
        bounded(bytes, expected)?;
        let actual = Digest::of(bytes);
        if actual != *expected {
            return Err(TreeError::DigestMismatch {
                expected: *expected,
                actual,
            });
        }
        let tree: Tree = serde_json::from_slice(bytes).map_err(|e| TreeError::Invalid {
            digest: *expected,
            reason: e.to_string(),
        })?;
        tree.check(expected)?;
        if tree.to_bytes() != bytes {
            return Err(TreeError::NotCanonical { digest: *expected });
        }
        Ok(tree)
    }

    /// The digest of a tree that came parsed (a manifest's root), checked as
    /// [`Tree::parse_untrusted`] checks stored bytes: size, format, names, order, sizes and
    /// one pack per chunk. Serialised once, which is its one byte form.
    pub fn named(&self) -> Result<Digest, TreeError> {
        let bytes = self.to_bytes();
        let digest = Digest::of(&bytes);
        bounded(&bytes, &digest)?;
        self.check(&digest)?;
        Ok(digest)
    }

    /// What [`Tree::parse_untrusted`] checks of a parsed tree (named `digest` in errors):
    /// format, names, order, sizes and one pack per chunk.
    fn check(&self, digest: &Digest) -> Result<(), TreeError> {
        let tree = self;
        let invalid = |reason: String| TreeError::Invalid {
            digest: *digest,
            reason,
        };
        if tree.format != TREE_FORMAT {
            return Err(invalid(format!(
                "format {} (this bento reads trees of format {TREE_FORMAT})",
                tree.format
            )));
        }
        for pair in tree.entries.windows(2) {
            if pair[0].name >= pair[1].name {
                return Err(invalid(format!(
                    "{:?} is listed twice or out of order",
                    pair[1].name
                )));
            }
        }
        for e in &tree.entries {
            if !valid_name(&e.name) {
                return Err(invalid(format!("unsafe entry name {:?}", e.name)));
            }
            if let Node::File { size, .. } = e.node {
                if size > MAX_OBJECT_BYTES {
                    return Err(invalid(format!(
                        "{:?} is {size} bytes, more than the {MAX_OBJECT_BYTES}-byte limit",
                        e.name
                    )));
                }
            }
        }
        let want = chunks(&tree.entries).len();
        if tree.packs.len() != want {
            return Err(invalid(format!(
                "it names {} packs for {want} packs' worth of files",
                tree.packs.len()
            )));
        }
        Ok(())
    }
}

/// A tree's bytes within [`MAX_TREE_BYTES`].
fn bounded(bytes: &[u8], digest: &Digest) -> Result<(), TreeError> {
    match bytes.len() as u64 {
        size if size > MAX_TREE_BYTES => Err(TreeError::TooLarge {
            digest: *digest,
            size,
        }),
        _ => Ok(()),
    }
}

/// The stored form of one configuration: its root tree, every tree object by digest (a
/// subtree that occurs twice with the same content is one object) and every pack with its
/// layout. Trees and layouts are shared, not copied: a thousand hosts sharing `common/` hold
/// one copy of its trees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trees {
    pub root: Digest,
    pub trees: BTreeMap<Digest, Arc<[u8]>>,
    pub packs: BTreeMap<Digest, Arc<PackIndex>>,
}

impl Trees {
    /// Records a pack's layout. Two chunks can make the same bytes (`a`+`b` and `ab`): both
    /// layouts describe them truly, so the pack keeps every entry of both.
    fn add_pack(&mut self, index: Arc<PackIndex>) {
        match self.packs.entry(index.pack) {
            Slot::Vacant(v) => {
                v.insert(index);
            }
            Slot::Occupied(mut o) if *o.get() != index => {
                let have = Arc::make_mut(o.get_mut());
                let mut all: BTreeMap<Digest, crate::protocol::pack::PackEntry> =
                    have.entries.iter().map(|e| (e.sha256, *e)).collect();
                for e in &index.entries {
                    all.entry(e.sha256).or_insert(*e);
                }
                have.entries = all.into_values().collect();
            }
            Slot::Occupied(_) => {}
        }
    }

    /// Every pack holding a file, by the file's digest (the first pack, when several do).
    pub fn packed(&self) -> BTreeMap<Digest, &PackIndex> {
        let mut out = BTreeMap::new();
        for p in self.packs.values() {
            for e in &p.entries {
                out.entry(e.sha256).or_insert(&**p);
            }
        }
        out
    }
}

/// Expands the tree `root` into the format-1 listing the agent applies (directories before
/// their contents, sorted by path) and the trees and packs it is stored as, reading each
/// tree through `fetch`, which returns the tree's bytes as stored (shared bytes are kept
/// shared). Each tree is checked against its digest; a subtree named from several places is
/// fetched once.
pub fn expand<B: Into<Arc<[u8]>>>(
    root: &Digest,
    mut fetch: impl FnMut(&Digest) -> Result<B, TreeError>,
) -> Result<(Vec<ConfigEntry>, Trees), TreeError> {
    let mut seen: BTreeMap<Digest, Tree> = BTreeMap::new();
    let mut stored = Trees {
        root: *root,
        trees: BTreeMap::new(),
        packs: BTreeMap::new(),
    };
    let mut out = Vec::new();
    // (tree, its path, depth): explicit stack, so depth cannot overflow the host's stack.
    let mut stack: Vec<(Digest, Option<RelPath>, usize)> = vec![(*root, None, 0)];
    while let Some((digest, at, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Err(TreeError::TooDeep {
                path: at.map(|p| p.as_str().to_owned()).unwrap_or_default(),
            });
        }
        let tree = match seen.entry(digest) {
            Slot::Occupied(o) => o.into_mut(),
            Slot::Vacant(v) => {
                let bytes: Arc<[u8]> = fetch(&digest)?.into();
                let tree = Tree::parse_untrusted(&bytes, &digest)?;
                for index in tree.pack_indexes() {
                    stored.add_pack(Arc::new(index));
                }
                stored.trees.insert(digest, bytes);
                v.insert(tree)
            }
        };
        if out.len() + tree.entries.len() > MAX_ENTRIES {
            return Err(TreeError::TooManyEntries { root: *root });
        }
        let mut subtrees = Vec::new();
        for e in &tree.entries {
            let path = match &at {
                Some(p) => p.join(&e.name),
                None => RelPath::new(&e.name),
            }
            .map_err(|bad| TreeError::Invalid {
                digest,
                reason: bad.to_string(),
            })?;
            out.push(match e.node {
                Node::File {
                    size,
                    sha256,
                    executable,
                } => ConfigEntry::File {
                    path,
                    size,
                    sha256,
                    executable,
                },
                Node::Tree { sha256 } => {
                    subtrees.push((sha256, Some(path.clone()), depth + 1));
                    ConfigEntry::Directory { path }
                }
            });
        }
        stack.extend(subtrees);
    }
    out.sort_by(|a, b| a.path().cmp(b.path()));
    Ok((out, stored))
}
/// Unit tests' pack names: a hash of the chunk's file digests (publish hashes the pack's
/// bytes, which tests do not have).
#[cfg(test)]
pub(crate) fn test_pack_of(files: &[(Digest, u64)]) -> Result<Digest, std::convert::Infallible> {
    let names: Vec<u8> = files.iter().flat_map(|(d, _)| *d.as_bytes()).collect();
    Ok(Digest::of(&names))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &str) -> ConfigEntry {
        ConfigEntry::File {
            path: RelPath::new(path).unwrap(),
            size: content.len() as u64,
            sha256: Digest::of(content.as_bytes()),
            executable: false,
        }
    }

    fn dir(path: &str) -> ConfigEntry {
        ConfigEntry::Directory {
            path: RelPath::new(path).unwrap(),
        }
    }

    fn host(name: &str) -> Vec<ConfigEntry> {
        let mut v = vec![
            dir("common"),
            dir("common/users"),
            file("common/base.nix", "{ }"),
            file("common/users/admin.nix", "{ users = 1; }"),
            file("configuration.nix", name),
        ];
        v.sort_by(|a, b| a.path().cmp(b.path()));
        v
    }

    /// The tests' packs: named by their files' digests (publish hashes the bytes).
    fn build(entries: &[ConfigEntry]) -> Trees {
        build_with(entries, &Subtrees::default())
    }

    fn build_with(entries: &[ConfigEntry], memo: &Subtrees) -> Trees {
        super::build(entries, test_pack_of, memo).unwrap().0
    }

    fn fetcher(built: &Trees) -> impl FnMut(&Digest) -> Result<Vec<u8>, TreeError> + '_ {
        |d| {
            built
                .trees
                .get(d)
                .map(|b| b.to_vec())
                .ok_or(TreeError::Missing {
                    tree: *d,
                    reason: "not built".into(),
                })
        }
    }

    #[test]
    fn a_listing_survives_build_and_expand() {
        let listing = host("web1");
        let built = build(&listing);
        let (config, stored) = expand(&built.root, fetcher(&built)).unwrap();
        assert_eq!(config, listing);
        assert_eq!(stored, built);
    }

    #[test]
    fn hosts_sharing_a_subtree_share_its_object_and_a_change_makes_one_new_tree() {
        let a = build(&host("web1"));
        let b = build(&host("web2"));
        assert_ne!(a.root, b.root);
        let shared: Vec<_> = a.trees.keys().filter(|d| b.trees.contains_key(d)).collect();
        assert_eq!(
            shared.len(),
            2,
            "common/ and common/users/ are the same objects"
        );

        let mut changed = host("web1");
        changed[2] = file("common/base.nix", "{ x = 1; }");
        let c = build(&changed);
        let new: Vec<_> = c
            .trees
            .keys()
            .filter(|d| !a.trees.contains_key(d))
            .collect();
        assert_eq!(
            new.len(),
            2,
            "the root and common/ change, common/users/ does not"
        );
    }

    #[test]
    fn a_tree_has_one_byte_form() {
        let built = build(&host("web1"));
        // The root: it has more than one entry, so reversing them reorders.
        let (digest, bytes) = (&built.root, &built.trees[&built.root]);
        assert!(Tree::parse_untrusted(bytes, digest).is_ok());

        let mut tree: Tree = serde_json::from_slice(bytes).unwrap();
        tree.entries.reverse();
        let reordered = tree.to_bytes();
        assert!(matches!(
            Tree::parse_untrusted(&reordered, &Digest::of(&reordered)),
            Err(TreeError::Invalid { .. })
        ));
        let mut spaced = serde_json::to_vec_pretty(&build_tree_of(bytes)).unwrap();
        spaced.push(b'\n');
        assert!(matches!(
            Tree::parse_untrusted(&spaced, &Digest::of(&spaced)),
            Err(TreeError::NotCanonical { .. })
        ));
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let extra = text.replacen("{\"format\":2,", "{\"format\":2,\"extra\":1,", 1);
        assert!(Tree::parse_untrusted(extra.as_bytes(), &Digest::of(extra.as_bytes())).is_err());
        assert!(matches!(
            Tree::parse_untrusted(bytes, &Digest::of(b"other")),
            Err(TreeError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn an_entry_is_one_flat_object_of_its_kinds_fields_and_no_other() {
        let d = Digest::of(b"x");
        let tree = Tree {
            format: TREE_FORMAT,
            entries: vec![
                Entry {
                    name: "a.nix".into(),
                    node: Node::File {
                        size: 1,
                        sha256: d,
                        executable: true,
                    },
                },
                Entry {
                    name: "b".into(),
                    node: Node::Tree { sha256: d },
                },
            ],
            packs: vec![d],
        };
        let text = format!(
            "{{\"format\":2,\"entries\":[{{\"name\":\"a.nix\",\"kind\":\"file\",\"size\":1,\"sha256\":\"{d}\",\"executable\":true}},{{\"name\":\"b\",\"kind\":\"tree\",\"sha256\":\"{d}\"}}],\"packs\":[\"{d}\"]}}\n"
        );
        assert_eq!(String::from_utf8(tree.to_bytes()).unwrap(), text);
        assert_eq!(serde_json::from_str::<Tree>(&text).unwrap(), tree);
        // Fields in another order still read (the canonical check refuses those bytes).
        let shuffled = format!(r#"{{"sha256":"{d}","kind":"tree","name":"b"}}"#);
        assert_eq!(
            serde_json::from_str::<Entry>(&shuffled).unwrap(),
            tree.entries[1]
        );
        let file = format!(r#""name":"a","kind":"file","size":1,"sha256":"{d}""#);
        let dir = format!(r#""name":"b","kind":"tree","sha256":"{d}""#);
        for bad in [
            format!("{{{file}}}"),
            format!("{{{file},\"executable\":false,\"mode\":1}}"),
            format!("{{{file},\"executable\":false,\"size\":2}}"),
            format!("{{{dir},\"size\":1}}"),
            format!("{{{dir},\"executable\":false}}"),
            format!(r#"{{"name":"b","kind":"link","sha256":"{d}"}}"#),
            format!(r#"{{"name":"b","sha256":"{d}"}}"#),
            format!(r#"{{"kind":"tree","sha256":"{d}"}}"#),
            r#"{"name":"b","kind":"tree"}"#.to_owned(),
        ] {
            assert!(serde_json::from_str::<Entry>(&bad).is_err(), "{bad}");
        }
    }

    fn build_tree_of(bytes: &[u8]) -> Tree {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn unsafe_names_are_refused() {
        for name in ["..", ".", "a/b", "", "x\0"] {
            let bytes = Tree {
                format: TREE_FORMAT,
                entries: vec![Entry {
                    name: name.into(),
                    node: Node::File {
                        size: 0,
                        sha256: Digest::of(b""),
                        executable: false,
                    },
                }],
                packs: vec![Digest::of(b"")],
            }
            .to_bytes();
            let err = Tree::parse_untrusted(&bytes, &Digest::of(&bytes)).unwrap_err();
            assert!(matches!(err, TreeError::Invalid { .. }), "{name:?}: {err}");
        }
    }

    /// Twenty levels of a tree naming its child twice is 2^20 paths from 21 objects.
    #[test]
    fn a_graph_of_shared_subtrees_cannot_expand_without_bound() {
        let mut trees = BTreeMap::new();
        let mut child = {
            let bytes = Tree {
                format: TREE_FORMAT,
                entries: vec![],
                packs: vec![],
            }
            .to_bytes();
            let d = Digest::of(&bytes);
            trees.insert(d, bytes.into());
            d
        };
        for _ in 0..20 {
            let bytes = Tree {
                format: TREE_FORMAT,
                entries: ["a", "b"]
                    .iter()
                    .map(|n| Entry {
                        name: (*n).into(),
                        node: Node::Tree { sha256: child },
                    })
                    .collect(),
                packs: vec![],
            }
            .to_bytes();
            child = Digest::of(&bytes);
            trees.insert(child, bytes.into());
        }
        let built = Trees {
            root: child,
            trees,
            packs: BTreeMap::new(),
        };
        let mut fetches = 0;
        let err = expand(&built.root, |d| {
            fetches += 1;
            fetcher(&built)(d)
        })
        .unwrap_err();
        assert!(matches!(err, TreeError::TooManyEntries { .. }), "{err}");
        assert_eq!(fetches, 21, "each tree object is fetched once");
    }

    #[test]
    fn a_chain_deeper_than_the_limit_is_refused() {
        let mut trees = BTreeMap::new();
        let mut child = None;
        for _ in 0..=MAX_DEPTH + 1 {
            let entries = child
                .map(|sha256| {
                    vec![Entry {
                        name: "d".into(),
                        node: Node::Tree { sha256 },
                    }]
                })
                .unwrap_or_default();
            let bytes = Tree {
                format: TREE_FORMAT,
                entries,
                packs: vec![],
            }
            .to_bytes();
            let d = Digest::of(&bytes);
            trees.insert(d, bytes.into());
            child = Some(d);
        }
        let built = Trees {
            root: child.unwrap(),
            trees,
            packs: BTreeMap::new(),
        };
        let err = expand(&built.root, fetcher(&built)).unwrap_err();
        assert!(matches!(err, TreeError::TooDeep { .. }), "{err}");
    }

    #[test]
    fn a_changed_file_rewrites_one_pack_of_its_directory() {
        let mut listing = vec![dir("common")];
        for i in 0..200 {
            listing.push(file(
                &format!("common/m{i:03}.nix"),
                &format!("{{ m = {i}; }}"),
            ));
        }
        listing.push(file("common/big.bin", &"x".repeat(PACKED_MAX as usize + 1)));
        listing.sort_by(|a, b| a.path().cmp(b.path()));
        let a = build(&listing);
        let common = |t: &Trees| -> Tree {
            let root: Tree = serde_json::from_slice(&t.trees[&t.root]).unwrap();
            let Node::Tree { sha256 } = root.entries[0].node else {
                panic!("common/ is a tree")
            };
            serde_json::from_slice(&t.trees[&sha256]).unwrap()
        };
        let before = common(&a);
        assert!(
            (4..=40).contains(&before.packs.len()),
            "200 files make about 200/16 packs: {}",
            before.packs.len()
        );
        let chunked = chunks(&before.entries);
        assert!(chunked.iter().all(|c| c.len() <= CHUNK_MAX));
        assert_eq!(
            chunked.iter().map(Vec::len).sum::<usize>(),
            200,
            "every small file is packed, the large one is not"
        );
        assert!(
            !a.packed()
                .contains_key(&Digest::of("x".repeat(PACKED_MAX as usize + 1).as_bytes())),
            "a file over PACKED_MAX is in no pack"
        );

        let at = listing
            .iter()
            .position(|e| e.path().as_str() == "common/m100.nix")
            .unwrap();
        listing[at] = file("common/m100.nix", "{ m = 'changed'; }");
        let after = common(&build(&listing));
        assert_eq!(
            after.packs.len(),
            before.packs.len(),
            "the cuts did not move"
        );
        let changed = before
            .packs
            .iter()
            .zip(&after.packs)
            .filter(|(x, y)| x != y)
            .count();
        assert_eq!(changed, 1, "one pack holds the changed file");
    }

    #[test]
    fn a_tree_naming_the_wrong_packs_is_refused() {
        let built = build(&host("web1"));
        let mut root: Tree = serde_json::from_slice(&built.trees[&built.root]).unwrap();
        assert!(!root.packs.is_empty());
        for packs in [vec![], vec![root.packs[0]; root.packs.len() + 1]] {
            root.packs = packs;
            let bytes = root.to_bytes();
            let err = Tree::parse_untrusted(&bytes, &Digest::of(&bytes)).unwrap_err();
            assert!(matches!(err, TreeError::Invalid { .. }), "{err}");
        }
    }

    #[test]
    fn a_directory_found_by_its_listing_is_the_one_building_makes() {
        // `common/base.nix` holding `base`, and everything under `top/` instead of `common/`.
        let variant = |name: &str, top: &str, base: &str| -> Vec<ConfigEntry> {
            let mut out: Vec<ConfigEntry> = host(name)
                .into_iter()
                .map(|e| {
                    let path = e.path().as_str().replacen("common", top, 1);
                    match e {
                        ConfigEntry::Directory { .. } => dir(&path),
                        ConfigEntry::File { path: was, .. }
                            if was.as_str() == "common/base.nix" =>
                        {
                            file(&path, base)
                        }
                        ConfigEntry::File {
                            size,
                            sha256,
                            executable,
                            ..
                        } => ConfigEntry::File {
                            path: RelPath::new(&path).unwrap(),
                            size,
                            sha256,
                            executable,
                        },
                    }
                })
                .collect();
            out.sort_by(|a, b| a.path().cmp(b.path()));
            out
        };
        let mut unsorted = host("web5");
        unsorted.reverse();
        let hosts = [
            host("web1"),
            host("web2"),
            variant("web3", "common", "{ x = 1; }"),
            // The same content under another name: found by its content key.
            variant("web4", "shared", "{ }"),
            unsorted,
        ];
        let distinct = (0..6).map(|n| variant("web6", "common", &format!("{{ n = {n}; }}")));
        let memo = Subtrees::default();
        for entries in hosts.into_iter().chain(distinct) {
            assert_eq!(build_with(&entries, &memo), build(&entries));
        }
        let listed = memo.by_listing.lock().unwrap();
        let common = &listed[&RelPath::new("common").unwrap()];
        assert_eq!(
            common.len(),
            4,
            "the first four listings of common/, no more"
        );
        assert_eq!(listed[&RelPath::new("shared").unwrap()].len(), 1);
    }

    #[test]
    fn a_subtree_built_for_one_host_is_reused_for_the_next_and_is_the_same() {
        let memo = Subtrees::default();
        for host_name in ["web1", "web2", "web1"] {
            let shared = build_with(&host(host_name), &memo);
            assert_eq!(shared, build(&host(host_name)), "{host_name}");
        }
        assert_eq!(
            memo.by_key.lock().unwrap().len(),
            2,
            "common/ and common/users/, once each; roots are not kept"
        );
    }
}
