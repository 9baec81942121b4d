//! Manifest format 2's trees (issue #26): one directory's listing is an object of its own,
//! named like every object by the sha256 of its canonical bytes, so a subtree many hosts share
//! (`common/`) is one object they all name and one change to it is one new tree, not a new
//! file list per host. Invariant: a tree's digest fixes every byte below it (entries name
//! files and subtrees by digest), every tree has exactly one byte form (`parse_untrusted`
//! refuses any other), and expanding a tree from an untrusted source is bounded in depth and
//! in entries, so a hostile graph of shared subtrees cannot exhaust a host.

use std::collections::btree_map::Entry as Slot;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::protocol::manifest::{ConfigEntry, Digest, RelPath, MAX_OBJECT_BYTES};

/// What `format` a tree object says it is.
pub const TREE_FORMAT: u32 = 2;
/// A tree object larger than this is refused unread.
pub const MAX_TREE_BYTES: u64 = 16 * 1024 * 1024;
/// Deepest nesting a host expands (a configuration tree is rarely ten deep).
pub const MAX_DEPTH: usize = 64;
/// Most entries a host expands from one root, counting a shared subtree once per place it
/// appears: what bounds a graph that names one subtree from many places.
pub const MAX_ENTRIES: usize = 200_000;

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

/// What one name in a directory is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Node {
    File {
        size: u64,
        sha256: Digest,
        executable: bool,
    },
    /// A subdirectory: the digest of its own tree object.
    Tree { sha256: Digest },
}

// No `deny_unknown_fields` (serde cannot combine it with `flatten`): an unknown field is
// refused anyway, since the bytes then differ from the canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// One path component.
    pub name: String,
    #[serde(flatten)]
    pub node: Node,
}

/// One directory's listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tree {
    pub format: u32,
    pub entries: Vec<Entry>,
}

/// A name is one safe path component, the rule `RelPath` keeps for each of its parts.
fn valid_name(name: &str) -> bool {
    !name.contains('/') && name.len() <= 255 && RelPath::new(name).is_ok()
}

impl Tree {
    /// The canonical bytes: what is stored as `objects/<digest>`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).expect("tree serialises");
        out.push(b'\n');
        out
    }

    pub fn digest(&self) -> Digest {
        Digest::of(&self.to_bytes())
    }

    /// Parses bytes from an untrusted source: size, digest, names, order and the one byte form.
    pub fn parse_untrusted(bytes: &[u8], expected: &Digest) -> Result<Tree, TreeError> {
        if bytes.len() as u64 > MAX_TREE_BYTES {
            return Err(TreeError::TooLarge {
                digest: *expected,
                size: bytes.len() as u64,
            });
        }
        let actual = Digest::of(bytes);
        if actual != *expected {
            return Err(TreeError::DigestMismatch {
                expected: *expected,
                actual,
            });
        }
        let invalid = |reason: String| TreeError::Invalid {
            digest: *expected,
            reason,
        };
        let tree: Tree = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
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
        if tree.to_bytes() != bytes {
            return Err(TreeError::NotCanonical { digest: *expected });
        }
        Ok(tree)
    }
}

/// The trees of a flat listing: the root's digest and every tree object by digest (a
/// subtree that occurs twice with the same content is one object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    pub root: Digest,
    pub trees: BTreeMap<Digest, Vec<u8>>,
}

/// Builds the trees of a format-1 listing (directories and files by path). The listing must
/// be what `Manifest::parse` accepts: each parent listed, no duplicates.
pub fn build(entries: &[ConfigEntry]) -> Built {
    #[derive(Default)]
    struct Dir {
        files: BTreeMap<String, Node>,
        dirs: BTreeMap<String, Dir>,
    }
    fn dir_at<'a>(root: &'a mut Dir, path: &str) -> &'a mut Dir {
        path.split('/')
            .fold(root, |d, part| d.dirs.entry(part.to_owned()).or_default())
    }
    fn split(path: &RelPath) -> (Option<&str>, &str) {
        match path.as_str().rsplit_once('/') {
            Some((parent, name)) => (Some(parent), name),
            None => (None, path.as_str()),
        }
    }
    fn emit(dir: Dir, trees: &mut BTreeMap<Digest, Vec<u8>>) -> Digest {
        let mut entries: Vec<Entry> = dir
            .files
            .into_iter()
            .map(|(name, node)| Entry { name, node })
            .collect();
        for (name, sub) in dir.dirs {
            let sha256 = emit(sub, trees);
            entries.push(Entry {
                name,
                node: Node::Tree { sha256 },
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let bytes = Tree {
            format: TREE_FORMAT,
            entries,
        }
        .to_bytes();
        let digest = Digest::of(&bytes);
        trees.insert(digest, bytes);
        digest
    }

    let mut root = Dir::default();
    for e in entries {
        let (parent, name) = split(e.path());
        let dir = match parent {
            Some(p) => dir_at(&mut root, p),
            None => &mut root,
        };
        match e {
            ConfigEntry::Directory { .. } => {
                dir.dirs.entry(name.to_owned()).or_default();
            }
            ConfigEntry::File {
                size,
                sha256,
                executable,
                ..
            } => {
                dir.files.insert(
                    name.to_owned(),
                    Node::File {
                        size: *size,
                        sha256: *sha256,
                        executable: *executable,
                    },
                );
            }
        }
    }
    let mut trees = BTreeMap::new();
    let root = emit(root, &mut trees);
    Built { root, trees }
}

/// Expands the tree `root` into the format-1 listing the agent applies (directories before
/// their contents, sorted by path), reading each tree through `fetch`, which returns the
/// tree's bytes as stored. Each tree is checked against its digest; a subtree named from
/// several places is fetched once.
pub fn expand(
    root: &Digest,
    mut fetch: impl FnMut(&Digest) -> Result<Vec<u8>, TreeError>,
) -> Result<Vec<ConfigEntry>, TreeError> {
    let mut seen: BTreeMap<Digest, Tree> = BTreeMap::new();
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
            Slot::Vacant(v) => v.insert(Tree::parse_untrusted(&fetch(&digest)?, &digest)?),
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
    Ok(out)
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

    fn fetcher(built: &Built) -> impl FnMut(&Digest) -> Result<Vec<u8>, TreeError> + '_ {
        |d| {
            built.trees.get(d).cloned().ok_or(TreeError::Missing {
                tree: *d,
                reason: "not built".into(),
            })
        }
    }

    #[test]
    fn a_listing_survives_build_and_expand() {
        let listing = host("web1");
        let built = build(&listing);
        assert_eq!(expand(&built.root, fetcher(&built)).unwrap(), listing);
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
        let (digest, bytes) = built.trees.iter().next().unwrap();
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
        let text = String::from_utf8(bytes.clone()).unwrap();
        let extra = text.replacen("{\"format\":2,", "{\"format\":2,\"extra\":1,", 1);
        assert!(Tree::parse_untrusted(extra.as_bytes(), &Digest::of(extra.as_bytes())).is_err());
        assert!(matches!(
            Tree::parse_untrusted(bytes, &Digest::of(b"other")),
            Err(TreeError::DigestMismatch { .. })
        ));
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
            }
            .to_bytes();
            let d = Digest::of(&bytes);
            trees.insert(d, bytes);
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
            }
            .to_bytes();
            child = Digest::of(&bytes);
            trees.insert(child, bytes);
        }
        let built = Built { root: child, trees };
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
            }
            .to_bytes();
            let d = Digest::of(&bytes);
            trees.insert(d, bytes);
            child = Some(d);
        }
        let built = Built {
            root: child.unwrap(),
            trees,
        };
        let err = expand(&built.root, fetcher(&built)).unwrap_err();
        assert!(matches!(err, TreeError::TooDeep { .. }), "{err}");
    }
}
