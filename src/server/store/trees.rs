//! Reading a format-2 manifest whole on the server: its trees come from the host's own
//! area through the [`Store`], like anything else the host is served. Trees are named by the
//! hash of their bytes and never change, so one process-wide cache serves every host that
//! shares a subtree (a fleet's `common/` is read once per run, not once per host) and can
//! never be stale; it is bounded in bytes.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use super::Store;
use crate::protocol::layout::Key;
use crate::protocol::manifest::{Digest, Manifest, ManifestError};
use crate::protocol::tree::{TreeError, Trees, MAX_TREE_BYTES};
use crate::protocol::HostName;

/// Beyond this many cached bytes the cache starts over.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Default)]
struct Cache {
    trees: HashMap<Digest, std::sync::Arc<[u8]>>,
    bytes: usize,
}

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn keep(digest: Digest, bytes: &[u8]) {
    let mut c = cache().lock().expect("tree cache");
    if c.bytes + bytes.len() > CACHE_BYTES {
        *c = Cache::default();
    }
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

/// Fills a format-2 manifest's `config` from its trees in `host`'s area (nothing to do for
/// format 1). A tree that is missing or fails its digest is an error naming it.
pub fn expand(store: &dyn Store, host: &HostName, m: &mut Manifest) -> Result<(), ManifestError> {
    m.expand(|d| {
        if let Some(bytes) = cache().lock().expect("tree cache").trees.get(d) {
            return Ok(bytes.to_vec());
        }
        let missing = |reason: String| TreeError::Missing { tree: *d, reason };
        let bytes = store
            .get(host, &Key::Object(*d), MAX_TREE_BYTES)
            .map_err(|e| missing(e.to_string()))?
            .ok_or_else(|| {
                missing(format!(
                    "{} is absent",
                    store.locate(host, &Key::Object(*d)).display()
                ))
            })?;
        // Only verified trees are cached: `expand` checks the digest after this returns,
        // so check it here first.
        if Digest::of(&bytes) == *d {
            keep(*d, &bytes);
        }
        Ok(bytes)
    })
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
        plan.store_as_trees(|_| Ok::<_, std::convert::Infallible>(Digest::of(b"pack")))
            .unwrap();
        let root = plan.tree.as_ref().unwrap().root;
        let mut read = Manifest::parse(&plan.to_bytes()).unwrap();
        let err = expand(&store, &host, &mut read).unwrap_err().to_string();
        assert!(err.contains(&root.to_hex()), "{err}");
        assert!(read.config.is_empty() && !read.is_expanded());
    }
}
