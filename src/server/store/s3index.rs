//! The publisher's index of an object store: what it put in the engine and saw there, kept
//! in its local state, so an unchanged publish costs one conditional GET per host. Immutable
//! keys (manifests, signatures, objects: named by their content) known present need no
//! request, `current` is asked for with its last ETag, and a manifest is read from the
//! publisher's own copy, checked against its digest.
//!
//! Invariant: the index only ever saves requests; it is never trusted for content (a copy
//! that does not hash to its name is not used) and a key removed behind the publisher's back
//! is found by the host (a 404, retried) and fixed by removing the index file, which makes
//! the next publish check everything again. Only a run holding the publish lock writes the
//! file, marked "open" before its first write, so neither a reader's stale copy nor a run
//! that died mid-way can leave a deleted key "present".

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use crate::protocol::layout::Chroot;
use crate::protocol::manifest::Digest;
use crate::protocol::HostName;
use crate::sys::atomic;

/// The index file in the publisher's state directory.
pub const INDEX_FILE: &str = "s3-index.json";
/// The publisher's copies of the manifests it put or read, per host, in its state.
pub const MANIFESTS_DIR: &str = "s3-manifests";

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Saved {
    /// The `[server] store` this index is of.
    store: String,
    /// `bucket/key` of immutable keys known present.
    present: BTreeSet<String>,
    /// `bucket/key` of each `current`: its text and ETag when last read or written.
    current: BTreeMap<String, (String, String)>,
    /// A run that writes holds the index (saved so before its first write). Found set on
    /// load, that run died before saving what it removed: `present` is not trusted.
    #[serde(default)]
    open: bool,
}

/// The index, loaded for one store.
#[derive(Debug)]
pub struct Index {
    state: Chroot,
    saved: Mutex<Saved>,
}

impl Index {
    /// The index `state` keeps for `store` (an empty one for another store or none).
    pub fn load(state: &Chroot, store: &str) -> Self {
        let saved = std::fs::read(state.state_dir().join(INDEX_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Saved>(&b).ok())
            .filter(|i| i.store == store)
            .map(|mut i| {
                if i.open {
                    tracing::warn!(
                        "the S3 index was left by a publish that did not finish: every object is checked again"
                    );
                    i.present.clear();
                    i.open = false;
                }
                i
            })
            .unwrap_or_else(|| Saved {
                store: store.to_owned(),
                ..Saved::default()
            });
        Self {
            state: state.clone(),
            saved: Mutex::new(saved),
        }
    }

    /// Marks the index held by a run that writes, durably, before its first write: a key
    /// that run removes leaves `present` in memory only, so if it dies before [`Index::save`]
    /// the next run must not trust what the file says is present (it would skip uploading
    /// an object the dead run deleted, and publish a version missing it).
    pub fn begin_writing(&self) -> Result<(), super::StoreError> {
        let mut saved = self.saved.lock().expect("not poisoned");
        if saved.open {
            return Ok(());
        }
        saved.open = true;
        let path = self.state.state_dir().join(INDEX_FILE);
        let bytes = serde_json::to_vec(&*saved).expect("index serialises");
        atomic::write_file(&path, &bytes, 0o600)
            .map_err(|source| super::StoreError::Io { at: path, source })
    }

    /// Keeps the index for the next run (best effort: a lost index costs requests only).
    /// Only a run that writes (under the publish lock) keeps it: a reader such as `bento
    /// status`, loaded before a publish deleted a key and saving after it, would bring the
    /// key back as "present".
    pub fn save(&self) {
        let mut saved = self.saved.lock().expect("not poisoned");
        let dir = self.state.state_dir();
        if !saved.open {
            return;
        }
        saved.open = false;
        if !dir.is_dir() {
            return;
        }
        let path = dir.join(INDEX_FILE);
        let bytes = serde_json::to_vec(&*saved).expect("index serialises");
        if let Err(e) = atomic::write_file(&path, &bytes, 0o600) {
            tracing::warn!("cannot keep the S3 index {}: {e}", path.display());
        }
    }

    pub fn known(&self, full: &str) -> bool {
        self.saved
            .lock()
            .expect("not poisoned")
            .present
            .contains(full)
    }

    pub fn learn(&self, full: String, present: bool) {
        let mut saved = self.saved.lock().expect("not poisoned");
        if present {
            saved.present.insert(full);
        } else {
            saved.present.remove(&full);
        }
    }

    /// The text and ETag of `current` as last seen.
    pub fn current(&self, full: &str) -> Option<(String, String)> {
        self.saved
            .lock()
            .expect("not poisoned")
            .current
            .get(full)
            .cloned()
    }

    /// Records `current`'s text and ETag (`None`: not known, or gone).
    pub fn set_current(&self, full: &str, seen: Option<(String, String)>) {
        let mut saved = self.saved.lock().expect("not poisoned");
        match seen {
            Some(entry) => saved.current.insert(full.to_owned(), entry),
            None => saved.current.remove(full),
        };
    }

    fn manifest_path(&self, host: &HostName, digest: &Digest) -> PathBuf {
        self.state
            .state_dir()
            .join(MANIFESTS_DIR)
            .join(host.as_str())
            .join(format!("{}.json", digest.to_hex()))
    }

    /// The publisher's copy of a manifest, when it has one that hashes to its digest.
    pub fn manifest(&self, host: &HostName, digest: &Digest, limit: u64) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.manifest_path(host, digest)).ok()?;
        (Digest::of(&bytes) == *digest && bytes.len() as u64 <= limit).then_some(bytes)
    }

    /// Keeps a copy of a manifest that hashes to its digest (best effort).
    pub fn keep_manifest(&self, host: &HostName, digest: &Digest, bytes: &[u8]) {
        if Digest::of(bytes) != *digest {
            return;
        }
        let path = self.manifest_path(host, digest);
        if path
            .parent()
            .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
        {
            let _ = atomic::write_file(&path, bytes, 0o600);
        }
    }

    pub fn drop_manifest(&self, host: &HostName, digest: &Digest) {
        let _ = std::fs::remove_file(self.manifest_path(host, digest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_is_kept_per_store_and_never_trusted_for_content() {
        let tmp = tempfile::tempdir().unwrap();
        let state = Chroot::new(tmp.path());
        std::fs::create_dir_all(state.state_dir()).unwrap();
        let index = Index::load(&state, "s3://a");
        index.begin_writing().unwrap();
        index.learn("b/k".into(), true);
        index.set_current("b/current", Some(("d\n".into(), "\"e1\"".into())));
        let alpha = HostName::new("alpha").unwrap();
        let d = Digest::of(b"manifest");
        index.keep_manifest(&alpha, &d, b"manifest");
        index.keep_manifest(&alpha, &Digest::of(b"x"), b"not x");
        index.save();
        let again = Index::load(&state, "s3://a");
        assert!(again.known("b/k"));
        assert_eq!(again.current("b/current").unwrap().1, "\"e1\"");
        assert_eq!(again.manifest(&alpha, &d, 100).unwrap(), b"manifest");
        assert!(again.manifest(&alpha, &Digest::of(b"x"), 100).is_none());
        // A copy changed on disk is not used.
        std::fs::write(again.manifest_path(&alpha, &d), b"tampered").unwrap();
        assert!(again.manifest(&alpha, &d, 100).is_none());
        // Another store's index is not this one's.
        assert!(!Index::load(&state, "s3://other").known("b/k"));
    }

    #[test]
    fn an_index_left_by_a_run_that_died_while_writing_is_not_trusted_for_presence() {
        let tmp = tempfile::tempdir().unwrap();
        let state = Chroot::new(tmp.path());
        std::fs::create_dir_all(state.state_dir()).unwrap();
        let index = Index::load(&state, "s3://a");
        index.begin_writing().unwrap();
        index.learn("b/objects/x".into(), true);
        index.set_current("b/current", Some(("d\n".into(), "\"e1\"".into())));
        index.save();
        // A run that writes, then dies after deleting the object (no save).
        let dying = Index::load(&state, "s3://a");
        dying.begin_writing().unwrap();
        dying.learn("b/objects/x".into(), false);
        drop(dying);
        let next = Index::load(&state, "s3://a");
        assert!(!next.known("b/objects/x"), "checked again, not trusted");
        // `current` is always asked for with its ETag: it stays.
        assert_eq!(next.current("b/current").unwrap().1, "\"e1\"");
        // A run that ends normally leaves a trusted index.
        next.begin_writing().unwrap();
        next.learn("b/objects/y".into(), true);
        next.save();
        assert!(Index::load(&state, "s3://a").known("b/objects/y"));
    }

    #[test]
    fn a_reader_never_writes_the_index_a_publish_keeps() {
        let tmp = tempfile::tempdir().unwrap();
        let state = Chroot::new(tmp.path());
        std::fs::create_dir_all(state.state_dir()).unwrap();
        let first = Index::load(&state, "s3://a");
        first.begin_writing().unwrap();
        first.learn("b/objects/x".into(), true);
        first.save();
        // `bento status` loads the index while a publish runs and deletes the object.
        let reader = Index::load(&state, "s3://a");
        let publish = Index::load(&state, "s3://a");
        publish.begin_writing().unwrap();
        publish.learn("b/objects/x".into(), false);
        publish.save();
        // The reader ends last: what it saves must not bring the object back.
        reader.set_current("b/current", Some(("d\n".into(), "\"e2\"".into())));
        reader.save();
        assert!(!Index::load(&state, "s3://a").known("b/objects/x"));
    }
}
