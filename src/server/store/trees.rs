//! Reading a format-2 manifest whole on the server: its trees come from the host's own
//! area through the [`Store`], like anything else the host is served. Trees are named by the
//! hash of their bytes and never change, so one process-wide cache serves every host that
//! shares a subtree (a fleet's `common/` is read once per run, not once per host) and can
//! never be stale; it is bounded in bytes. What each tree points at ([`Edges`]) is kept
//! across runs too (`load_edges`, `save_edges`): collecting after a publish then walks the
//! kept versions of 1,000 hosts without reading their root trees back.

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

fn keep(digest: Digest, bytes: &Arc<[u8]>) {
    let mut c = cache_with_room(bytes.len());
    if let std::collections::hash_map::Entry::Vacant(v) = c.trees.entry(digest) {
        v.insert(Arc::clone(bytes));
        c.bytes += bytes.len();
    }
}

/// Remembers the trees a publish built (so reading the version back costs no request), and
/// what they point at (so the next run's collection need not read them).
/// `root` is the root tree as built (the manifest carries it): its edges need no parse.
pub fn remember(trees: &Trees, root: (&Digest, &Tree)) {
    for (d, bytes) in &trees.trees {
        keep(*d, bytes);
        if edges().lock().expect("tree edges").get(d).is_some() {
            continue;
        }
        if d == root.0 {
            edges().lock().expect("tree edges").add(*d, root.1);
        // Built here, from canonical bytes: no need for the untrusted parse's checks.
        } else if let Ok(tree) = serde_json::from_slice::<Tree>(bytes) {
            edges().lock().expect("tree edges").add(*d, &tree);
        }
    }
}

/// Marks a live version's trees as still in use, so a run that leaves the version live
/// does not drop what the next collection will walk.
pub fn touch(root: &Digest) {
    let mut memo = edges().lock().expect("tree edges");
    let mut next = vec![*root];
    while let Some(d) = next.pop() {
        if let Some(e) = memo.get(&d) {
            next.extend(e.subtrees.iter().copied());
        }
    }
}

/// What one tree points at: its own objects (packs, files too large to pack) and its
/// subtrees. A tree never changes, so neither does this.
#[derive(Debug, PartialEq, Eq)]
struct Edges {
    objects: Vec<Digest>,
    subtrees: Vec<Digest>,
}

impl Edges {
    fn of(tree: &Tree) -> Self {
        let mut objects = tree.packs.clone();
        let mut subtrees = Vec::new();
        for e in &tree.entries {
            match e.node {
                Node::File { size, sha256, .. } if size > crate::protocol::pack::PACKED_MAX => {
                    objects.push(sha256);
                }
                Node::File { .. } => {}
                Node::Tree { sha256 } => subtrees.push(sha256),
            }
        }
        Edges { objects, subtrees }
    }
}

/// Every tree's [`Edges`] this process knows, and which of them this run walked or built
/// (what is saved after a publish of every host).
#[derive(Default)]
struct EdgeMemo {
    known: HashMap<Digest, Arc<Edges>>,
    used: std::collections::HashSet<Digest>,
    added: bool,
}

impl EdgeMemo {
    fn get(&mut self, d: &Digest) -> Option<Arc<Edges>> {
        let known = self.known.get(d)?.clone();
        self.used.insert(*d);
        Some(known)
    }

    fn add(&mut self, d: Digest, tree: &Tree) -> Arc<Edges> {
        let edges = Arc::new(Edges::of(tree));
        self.known.insert(d, edges.clone());
        self.used.insert(d);
        self.added = true;
        edges
    }
}

fn edges() -> &'static Mutex<EdgeMemo> {
    static EDGES: OnceLock<Mutex<EdgeMemo>> = OnceLock::new();
    EDGES.get_or_init(Default::default)
}

/// The edges file, in the publisher's state directory.
pub const EDGES: &str = "tree-edges";

/// The first line of the edges file: its format. Anything else is not read (a cache: the
/// trees are read instead).
const EDGES_MAGIC: &[u8] = b"bento tree edges 1\n";

/// Loads the edges a previous run saved at `path` (none when it is absent or unreadable:
/// the trees are read instead).
pub fn load_edges(path: &std::path::Path) {
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    let Some(parsed) = parse_edges(&bytes) else {
        tracing::debug!("{}: not a tree edges file; ignored", path.display());
        return;
    };
    let mut memo = edges().lock().expect("tree edges");
    for (d, e) in parsed {
        memo.known.entry(d).or_insert_with(|| Arc::new(e));
    }
}

/// Saves the edges for the next run: after a run over every host (`every_host`), only those
/// it walked, built or found live ([`touch`]); otherwise all it knows. Nothing is written
/// when nothing would change. (A version kept but not live of a host the run left alone is
/// dropped: its collection reads its trees again.)
pub fn save_edges(path: &std::path::Path, every_host: bool) -> std::io::Result<()> {
    let mut memo = edges().lock().expect("tree edges");
    if every_host {
        let used = std::mem::take(&mut memo.used);
        let before = memo.known.len();
        memo.known.retain(|d, _| used.contains(d));
        memo.added |= memo.known.len() != before;
        memo.used = used;
    }
    if !memo.added {
        return Ok(());
    }
    let out = encode_edges(memo.known.iter().map(|(d, e)| (d, e.as_ref())));
    crate::sys::atomic::write_file(path, &out, 0o600)?;
    memo.added = false;
    Ok(())
}

/// The bytes of an edges file: the magic line, then per tree (sorted) its digest, the
/// counts of its objects and subtrees (u32, little-endian) and their digests.
fn encode_edges<'a>(edges: impl Iterator<Item = (&'a Digest, &'a Edges)>) -> Vec<u8> {
    let mut sorted: Vec<_> = edges.collect();
    sorted.sort_by_key(|(d, _)| **d);
    let mut out = EDGES_MAGIC.to_vec();
    for (d, e) in sorted {
        out.extend_from_slice(d.as_bytes());
        for n in [e.objects.len(), e.subtrees.len()] {
            out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
        }
        for x in e.objects.iter().chain(&e.subtrees) {
            out.extend_from_slice(x.as_bytes());
        }
    }
    out
}

/// The records of an edges file; `None` for anything but a whole one.
fn parse_edges(bytes: &[u8]) -> Option<Vec<(Digest, Edges)>> {
    let mut r = crate::sys::binary::Reader::after(bytes, EDGES_MAGIC)?;
    let digests = |r: &mut crate::sys::binary::Reader<'_>, n: u32| -> Option<Vec<Digest>> {
        (0..n).map(|_| r.take().map(Digest::from_bytes)).collect()
    };
    let mut out = Vec::new();
    while !r.is_empty() {
        let d = Digest::from_bytes(r.take()?);
        let (objects, subtrees) = (r.u32()?, r.u32()?);
        let objects = digests(&mut r, objects)?;
        let subtrees = digests(&mut r, subtrees)?;
        out.push((d, Edges { objects, subtrees }));
    }
    Some(out)
}

/// A tree's bytes: the cache's, else the store's (then cached once verified).
fn tree_bytes(store: &dyn Store, host: &HostName, d: &Digest) -> Result<Arc<[u8]>, TreeError> {
    if let Some(bytes) = cache().lock().expect("tree cache").trees.get(d) {
        return Ok(Arc::clone(bytes));
    }
    let missing = |reason: String| TreeError::Missing { tree: *d, reason };
    let key = Key::Object(*d);
    let bytes = store
        .get(host, &key, MAX_TREE_BYTES)
        .map_err(|e| missing(e.to_string()))?
        .ok_or_else(|| missing(format!("{} is absent", store.locate(host, &key).display())))?;
    let bytes: Arc<[u8]> = bytes.into();
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
    let known = edges().lock().expect("tree edges").get(d);
    let edges = match known {
        Some(known) => known,
        None => {
            let tree = Tree::parse_untrusted(&tree_bytes(store, host, d)?, d)?;
            edges().lock().expect("tree edges").add(*d, &tree)
        }
    };
    let mut set = BTreeSet::from([*d]);
    set.extend(edges.objects.iter().copied());
    for sub in &edges.subtrees {
        set.extend(closure(store, host, sub, depth + 1)?.iter());
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
    // The root is the manifest's own, not an object: what it names is.
    let top = root_edges(tree);
    Ok(below(store, host, &top, m.files.iter().map(|f| f.sha256))?)
}

/// [`objects`] of a format-2 version known by its root tree's digest and its `files/`
/// objects alone; `None` when this process does not know the root's edges (then the
/// manifest, which holds the root, is read).
pub fn objects_below(
    store: &dyn Store,
    host: &HostName,
    root: &Digest,
    files: &[Digest],
) -> Option<Result<BTreeSet<Digest>, ManifestError>> {
    let top = edges().lock().expect("tree edges").get(root)?;
    Some(below(store, host, &top, files.iter().copied()).map_err(Into::into))
}

/// What a version whose root tree points at `top` uses: those objects, its subtrees' and
/// its `files/` objects.
fn below(
    store: &dyn Store,
    host: &HostName,
    top: &Edges,
    files: impl Iterator<Item = Digest>,
) -> Result<BTreeSet<Digest>, TreeError> {
    let mut set: BTreeSet<Digest> = top.objects.iter().copied().collect();
    for sub in &top.subtrees {
        set.extend(closure(store, host, sub, 1)?.iter());
    }
    set.extend(files);
    Ok(set)
}

/// What a manifest's root tree points at: known, or learnt from the manifest (which holds
/// the root).
fn root_edges(tree: &crate::protocol::manifest::TreeRef) -> Arc<Edges> {
    let mut memo = edges().lock().expect("tree edges");
    match memo.get(&tree.root) {
        Some(known) => known,
        None => memo.add(tree.root, &tree.top),
    }
}

/// Learns what a format-2 manifest's root tree points at, so collecting the version later
/// need not read it again.
pub fn know_root(m: &Manifest) {
    if let Some(tree) = &m.tree {
        root_edges(tree);
    }
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
            crate::server::publish::fixture::plan("alpha", &[("d/a.nix", "{ }")], 1).manifest;
        plan.config
            .push(crate::protocol::manifest::ConfigEntry::Directory {
                path: crate::protocol::manifest::RelPath::new("d").unwrap(),
            });
        plan.canonicalize();
        plan.store_as_trees(crate::protocol::tree::test_pack_of, &Default::default())
            .unwrap();
        // The root is in the manifest: `d/`'s tree is the one missing.
        let stored = plan.stored().unwrap();
        let root = *stored.trees.keys().find(|d| **d != stored.root).unwrap();
        let mut read = Manifest::parse(&plan.to_bytes()).unwrap();
        let err = expand(&store, &host, &mut read).unwrap_err().to_string();
        assert!(err.contains(&root.to_hex()), "{err}");
        assert!(read.config.is_empty() && !read.is_expanded());
    }

    #[test]
    fn the_edges_file_reads_back_what_was_saved_and_nothing_of_a_broken_one() {
        let d = |s: &str| Digest::of(s.as_bytes());
        let edges = [
            (
                d("root"),
                Edges {
                    objects: vec![d("pack")],
                    subtrees: vec![d("common")],
                },
            ),
            (
                d("common"),
                Edges {
                    objects: vec![d("p1"), d("big")],
                    subtrees: vec![],
                },
            ),
            (
                d("empty"),
                Edges {
                    objects: vec![],
                    subtrees: vec![],
                },
            ),
        ];
        let bytes = encode_edges(edges.iter().map(|(d, e)| (d, e)));
        let mut read = parse_edges(&bytes).unwrap();
        read.sort_by_key(|(d, _)| *d);
        let mut want: Vec<_> = edges.into_iter().collect();
        want.sort_by_key(|(d, _)| *d);
        assert_eq!(read, want);
        // Cut anywhere after the magic line, or another format: not a word of it is used.
        for cut in [EDGES_MAGIC.len() + 5, bytes.len() - 1] {
            assert!(parse_edges(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        assert!(parse_edges(b"bento tree edges 2\n").is_none());
        assert_eq!(parse_edges(EDGES_MAGIC).unwrap(), vec![]);
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
