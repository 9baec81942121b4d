//! Reading a format-2 manifest whole on the server: its trees come from the host's own
//! area through the [`Store`], like anything else the host is served. Trees are named by the
//! hash of their bytes and never change, so one process-wide cache serves every host that
//! shares a subtree (a fleet's `common/` is read once per run, not once per host) and can
//! never be stale; it is bounded in bytes.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use super::Store;
use crate::protocol::layout::Key;
use crate::protocol::manifest::{Digest, Manifest, ManifestError};
use crate::protocol::tree::{Node, Tree, TreeError, Trees, MAX_DEPTH, MAX_TREE_BYTES};
use crate::protocol::HostName;

/// Beyond this many cached tree bytes, or this many walked trees, the cache starts over.
const CACHE_BYTES: usize = 64 * 1024 * 1024;
const CACHE_CLOSURES: usize = 64 * 1024;

#[derive(Default)]
struct Cache {
    trees: HashMap<Digest, std::sync::Arc<[u8]>>,
    bytes: usize,
    /// The objects below each tree (itself, its packs, its large files, its subtrees'),
    /// so GC walks a shared subtree once per process, not once per host and version.
    closures: HashMap<Digest, Arc<BTreeSet<Digest>>>,
}

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The cache, emptied first when `more` bytes or one more walk would pass its bounds.
fn cache_with_room(more: usize) -> std::sync::MutexGuard<'static, Cache> {
    let mut c = cache().lock().expect("tree cache");
    if c.bytes + more > CACHE_BYTES || c.closures.len() >= CACHE_CLOSURES {
        *c = Cache::default();
    }
    c
}

fn keep(digest: Digest, bytes: &[u8]) {
    let mut c = cache_with_room(bytes.len());
    if c.trees.insert(digest, bytes.into()).is_none() {
        c.bytes += bytes.len();
    }
}

/// Remembers the trees a publish built (so reading the version back costs no request).
pub fn remember(trees: &Trees) {
    for (d, bytes) in &trees.trees {
        keep(*d, bytes);
    }
}

/// A tree's bytes: the cache's, else the store's (then cached once verified).
fn tree_bytes(store: &dyn Store, host: &HostName, d: &Digest) -> Result<Vec<u8>, TreeError> {
    if let Some(bytes) = cache().lock().expect("tree cache").trees.get(d) {
        return Ok(bytes.to_vec());
    }
    let missing = |reason: String| TreeError::Missing { tree: *d, reason };
    let key = Key::Object(*d);
    let bytes = store
        .get(host, &key, MAX_TREE_BYTES)
        .map_err(|e| missing(e.to_string()))?
        .ok_or_else(|| missing(format!("{} is absent", store.locate(host, &key).display())))?;
    // Only verified trees are cached: the caller checks the digest after this returns, so
    // check it here first.
    if Digest::of(&bytes) == *d {
        keep(*d, &bytes);
    }
    Ok(bytes)
}

fn closure(
    store: &dyn Store,
    host: &HostName,
    d: &Digest,
    depth: usize,
) -> Result<Arc<BTreeSet<Digest>>, TreeError> {
    if let Some(set) = cache().lock().expect("tree cache").closures.get(d) {
        return Ok(set.clone());
    }
    if depth > MAX_DEPTH {
        return Err(TreeError::TooDeep {
            path: format!("(tree {d})"),
        });
    }
    let tree = Tree::parse_untrusted(&tree_bytes(store, host, d)?, d)?;
    let mut set = BTreeSet::from([*d]);
    set.extend(tree.packs.iter().copied());
    for e in &tree.entries {
        match e.node {
            Node::File { size, sha256, .. } if size > crate::protocol::pack::PACKED_MAX => {
                set.insert(sha256);
            }
            Node::File { .. } => {}
            Node::Tree { sha256 } => set.extend(closure(store, host, &sha256, depth + 1)?.iter()),
        }
    }
    let set = Arc::new(set);
    cache_with_room(0).closures.insert(*d, set.clone());
    Ok(set)
}

/// Every object a version needs (what GC keeps): [`Manifest::objects`] of it expanded, got
/// without expanding it. A format-2 version's trees are walked, each subtree once per
/// process: 1,000 hosts sharing `common/` cost its walk once.
pub fn objects(
    store: &dyn Store,
    host: &HostName,
    m: &Manifest,
) -> Result<BTreeSet<Digest>, ManifestError> {
    let Some(tree) = m.tree.as_ref().filter(|_| !m.is_expanded()) else {
        return Ok(m.objects());
    };
    let mut set = closure(store, host, &tree.root, 0)?.as_ref().clone();
    set.extend(m.files.iter().map(|f| f.sha256));
    Ok(set)
}

/// Fills a format-2 manifest's `config` from its trees in `host`'s area (nothing to do for
/// format 1). A tree that is missing or fails its digest is an error naming it.
pub fn expand(store: &dyn Store, host: &HostName, m: &mut Manifest) -> Result<(), ManifestError> {
    m.expand(|d| tree_bytes(store, host, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::MemStore;

    #[test]
    fn a_missing_tree_is_an_error_naming_it_never_an_empty_configuration() {
        let store = MemStore::default();
        let host = HostName::new("alpha").unwrap();
        let mut plan =
            crate::server::publish::fixture::plan("alpha", &[("a.nix", "{ }")], 1).manifest;
        plan.store_as_trees(crate::protocol::tree::test_pack_of, &Default::default())
            .unwrap();
        let root = plan.tree.as_ref().unwrap().root;
        let mut read = Manifest::parse(&plan.to_bytes()).unwrap();
        let err = expand(&store, &host, &mut read).unwrap_err().to_string();
        assert!(err.contains(&root.to_hex()), "{err}");
        assert!(read.config.is_empty() && !read.is_expanded());
    }

    #[test]
    fn objects_without_expanding_are_those_of_the_expanded_version() {
        let store = MemStore::default();
        let host = HostName::new("alpha").unwrap();
        let big = "x".repeat(crate::protocol::pack::PACKED_MAX as usize + 1);
        let mut m = crate::server::publish::fixture::plan(
            "alpha",
            &[("a.nix", "{ }"), ("d/b.nix", "{ b }"), ("d/e/big", &big)],
            1,
        )
        .manifest;
        m.config
            .push(crate::protocol::manifest::ConfigEntry::Directory {
                path: crate::protocol::manifest::RelPath::new("d").unwrap(),
            });
        m.config
            .push(crate::protocol::manifest::ConfigEntry::Directory {
                path: crate::protocol::manifest::RelPath::new("d/e").unwrap(),
            });
        m.canonicalize();
        m.store_as_trees(crate::protocol::tree::test_pack_of, &Default::default())
            .unwrap();
        store.open_host(&host).unwrap();
        for (d, bytes) in &m.stored().unwrap().trees {
            store
                .put_object(&host, d, &|| {
                    Ok(Box::new(std::io::Cursor::new(bytes.clone())))
                })
                .unwrap();
        }
        let read = Manifest::parse(&m.to_bytes()).unwrap();
        assert_eq!(objects(&store, &host, &read).unwrap(), m.objects());
    }
}
