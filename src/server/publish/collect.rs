//! What a publish removes once a version is live: versions beyond the kept ones, what a
//! killed publish left, and the objects none of the kept versions uses. Never the live
//! version or anything it uses.

use std::collections::BTreeSet;
use std::io;

use super::KEEP_VERSIONS;
use crate::protocol::layout::{Area, Key};
use crate::protocol::manifest::{Digest, Manifest, MAX_MANIFEST_BYTES};
use crate::protocol::HostName;
use crate::server::store::{Store, StoreError};

use super::versions::Summary;

/// Keeps the live version and the newest others up to `KEEP_VERSIONS` in all; removes
/// other manifests (and, when the live version is signed, every unsigned one), signatures
/// and freshness stamps without their manifest, and every object none of the kept manifests
/// uses. Returns what is known of the kept format-2 versions, for the publisher's memo
/// (`super::versions`).
pub fn collect_host(
    store: &dyn Store,
    host: &HostName,
    live: &Digest,
    known: &Known,
) -> Result<Vec<(Digest, Summary)>, StoreError> {
    let listed = store.list(host, Area::Manifests)?;
    // (order, digest, objects) of every version but the live one.
    type Other = (
        Option<(u64, std::time::SystemTime)>,
        Digest,
        Option<BTreeSet<Digest>>,
    );
    let mut others: Vec<Other> = Vec::new();
    // The objects of each kept version.
    let mut kept: Vec<BTreeSet<Digest>> = Vec::new();
    // What is known of each version, for the memo.
    let mut summaries: Vec<(Digest, Summary)> = Vec::new();
    let signed: BTreeSet<Digest> = listed
        .iter()
        .filter_map(|key| match key {
            Key::Signature(d) => Some(*d),
            _ => None,
        })
        .collect();
    // A signing fleet's live version is signed. There, a manifest without its signature is
    // what a publish killed between the two writes left: no host trusting the fleet's key
    // can use it, and keeping it would push a usable version out of the kept ones.
    let signing = signed.contains(live);
    for key in &listed {
        let Key::Manifest(digest) = key else {
            continue;
        };
        if digest != live && signing && !signed.contains(digest) {
            others.push((None, *digest, None));
            continue;
        }
        // The version this publish wrote is live: what it uses is known, its order unneeded.
        if digest == live {
            if let Some((objects, trees)) = known.uses.get(digest) {
                // A new manifest: the store has no record of it yet.
                if *trees {
                    store.keep_uses(host, digest, objects);
                }
                kept.push(objects.clone());
                summaries.extend(known.summaries.get(digest).map(|s| (*digest, s.clone())));
                continue;
            }
        }
        let found = match known.summaries.get(digest) {
            Some(s) => summarized(store, host, digest, s),
            None => None,
        };
        let found = match found {
            Some(found) => Some(found),
            None => read(store, host, key).map(|m| {
                let summary = Summary::of(&m);
                uses(store, host, digest, &m).map(|objects| (m.order(), objects, summary))
            }),
        };
        // What a version uses: format 2's from its trees (read, not expanded), or as the
        // store recorded it when this publisher last walked them.
        let parsed = match found {
            Some(Ok((order, objects, summary))) => {
                summaries.extend(summary.map(|s| (*digest, s)));
                Some((order, objects))
            }
            // The live version's objects are never collected on a guess.
            Some(Err(e)) if digest == live => {
                return Err(StoreError::Io {
                    at: store.locate(host, key),
                    source: io::Error::other(e.to_string()),
                })
            }
            Some(Err(_)) | None => None,
        };
        match parsed {
            Some((_, objects)) if digest == live => kept.push(objects),
            Some((order, objects)) => others.push((Some(order), *digest, Some(objects))),
            // Unreadable manifests are not a version anyone can use.
            None => others.push((None, *digest, None)),
        }
    }
    // Newest first: by serial, then (manifests from before serials) compared as times
    // (publish has written whole seconds and milliseconds); ties broken by digest so the
    // choice is stable. A manifest stamped in the future is not kept forever.
    others.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    let mut manifests: BTreeSet<Digest> = BTreeSet::from([*live]);
    for (i, (_, digest, parsed)) in others.into_iter().enumerate() {
        match parsed {
            Some(m) if i + 1 < KEEP_VERSIONS => {
                manifests.insert(digest);
                kept.push(m);
            }
            _ => store.delete(host, &Key::Manifest(digest))?,
        }
    }
    for key in &listed {
        if let Key::Signature(d) | Key::Fresh(d) = key {
            if !manifests.contains(d) {
                store.delete(host, key)?;
            }
        }
    }
    let used: BTreeSet<Digest> = kept.into_iter().flatten().collect();
    let listed: BTreeSet<Digest>;
    let held = match &known.objects {
        Some(held) => held,
        None => {
            listed = crate::server::store::listed_objects(store, host)?;
            &listed
        }
    };
    for d in held.difference(&used) {
        store.delete(host, &Key::Object(*d))?;
    }
    summaries.retain(|(d, _)| manifests.contains(d));
    Ok(summaries)
}

/// A version's order, the objects it uses and what the memo keeps of it.
type Found = Result<
    (
        (u64, std::time::SystemTime),
        BTreeSet<Digest>,
        Option<Summary>,
    ),
    crate::protocol::manifest::ManifestError,
>;

/// [`Found`] from what the publisher remembers of a version: `None` when its root tree's
/// edges are not known here (the manifest is read instead).
fn summarized(store: &dyn Store, host: &HostName, digest: &Digest, s: &Summary) -> Option<Found> {
    let objects = match store.uses(host, digest) {
        Some(known) => Ok(known),
        None => crate::server::store::trees::objects_below(store, host, &s.root, &s.files)?,
    };
    Some(objects.map(|objects| (s.order(), objects, Some(s.clone()))))
}

/// Manifest `key` of `host`, when it is there and parses.
fn read(store: &dyn Store, host: &HostName, key: &Key) -> Option<Manifest> {
    let bytes = store.get(host, key, MAX_MANIFEST_BYTES).ok()??;
    Manifest::parse(&bytes).ok()
}

/// The objects manifest `digest` of `host` uses: recorded by the store, else walked from its
/// trees (and recorded for the next collection: a manifest never changes, so neither does
/// what it uses).
fn uses(
    store: &dyn Store,
    host: &HostName,
    digest: &Digest,
    m: &Manifest,
) -> Result<BTreeSet<Digest>, crate::protocol::manifest::ManifestError> {
    if m.tree.is_none() {
        return Ok(m.objects());
    }
    if let Some(known) = store.uses(host, digest) {
        return Ok(known);
    }
    let objects = crate::server::store::trees::objects(store, host, m)?;
    store.keep_uses(host, digest, &objects);
    Ok(objects)
}

/// Frees what no host uses any more among what hosts share (the chroot's pool).
pub fn collect_pool(store: &dyn Store) -> Result<usize, StoreError> {
    store.collect_shared()
}

/// What a publish already knows of a host's versions, so collecting after the switch reads
/// nothing twice: what is known of the format-2 versions the numbering found (read, or
/// remembered), and the objects of the version it wrote.
#[derive(Debug, Default)]
pub struct Known {
    summaries: std::collections::HashMap<Digest, Summary>,
    /// And whether it is a format-2 version (what the store records: see [`uses`]).
    uses: std::collections::HashMap<Digest, (BTreeSet<Digest>, bool)>,
    /// Every object the host's area holds, when the publish listed them before writing
    /// (then these and what it wrote: no other writer while it holds the lock).
    objects: Option<BTreeSet<Digest>>,
}

impl Known {
    /// What is known of version `digest` (format 2 only: format 1's manifest is read again
    /// when collecting).
    pub fn keep(&mut self, digest: Digest, summary: Option<Summary>) {
        if let Some(summary) = summary {
            self.summaries.insert(digest, summary);
        }
    }

    /// The objects of version `digest` (one this publish wrote, of format 2 if `trees`).
    pub fn uses(&mut self, digest: Digest, objects: BTreeSet<Digest>, trees: bool) {
        self.uses.insert(digest, (objects, trees));
    }

    /// The host's objects: `held` as listed before the publish wrote, and `written`.
    pub fn held(&mut self, mut held: BTreeSet<Digest>, written: &BTreeSet<Digest>) {
        held.extend(written.iter().copied());
        self.objects = Some(held);
    }
}
