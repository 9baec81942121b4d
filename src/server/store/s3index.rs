//! The publisher's index of an object store: what it put in the engine and saw there, kept
//! in its local state, one file per host, so an unchanged publish costs one conditional GET
//! per host. Immutable keys (manifests, signatures, objects: named by their content) known
//! present need no request, `current` is asked for with its last ETag, and a manifest is
//! read from the publisher's own copy, checked against its digest.
//!
//! Invariants: the index only ever saves requests; it is never trusted for content (a copy
//! that does not hash to its name is not used). A host's confirmation of its live version
//! (its heartbeat named it) spares the heartbeat read only while `current` keeps the ETag it
//! was confirmed at, for at most [`CONFIRMATION_SECS`] (`publish::serial::numbered_last`). A host's file is written whole and
//! atomically when that host's publish commits (`current` switched), and before a key it
//! says is present is deleted, so a publish killed at any moment leaves files that claim no
//! key the engine lacks: the next publish uses them as they are. A key removed behind the
//! publisher's back is found by the host (a 404, retried) and fixed by removing the index,
//! which makes the next publish check everything again.
//!
//! A host's part also stands in for listing its `manifests/` and `objects/` (the serial
//! check and GC ask for both on every change) while it can be trusted to be the whole of
//! them: made exact by one listing, then kept by this publisher's own writes and deletes,
//! and dropped back to a listing whenever something else may have written there
//! ([`Index::trusted`] says when). A stale listing can only make GC keep a key it does not
//! know (GC deletes only what the listing names and no kept version uses); the listing is
//! taken again at least every [`RELIST_SECS`], so nothing is kept forever that way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::protocol::layout::Chroot;
use crate::protocol::manifest::Digest;
use crate::protocol::HostName;
use crate::sys::atomic;

/// Beside a manifest's copy: the objects it uses, one digest a line after its own.
const USES_EXT: &str = "objects";
/// The index's directory in the publisher's state directory: `<host>.json` per host.
pub const INDEX_DIR: &str = "s3-index";
/// The publisher's copies of the manifests it put or read, per host, in its state.
pub const MANIFESTS_DIR: &str = "s3-manifests";
/// How long a host's confirmation of its live version spares a no-change publish the read
/// of its heartbeat: `current`'s ETag cannot tell a store and a publisher's state restored
/// together from a backup (the same bytes, the same ETag), so a host that applied a newer
/// version before the restore is heard from again within this time even when nothing
/// changes (a change of the host's content reads the heartbeat at once).
pub const CONFIRMATION_SECS: u64 = 24 * 3600;
/// How long a host's listing, kept up to date by this publisher's writes, stands in for the
/// engine's: whatever the index cannot see (a key another publisher wrote without switching
/// `current`, a delete killed after the index forgot the key) is found and collected within
/// this time.
pub const RELIST_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Saved {
    /// The `[server] store` this index is of.
    store: String,
    /// `bucket/key` of the host's immutable keys known present.
    present: BTreeSet<String>,
    /// `bucket/key` of the host's `current`: its text and ETag when last read or written.
    current: BTreeMap<String, (String, String)>,
    /// `bucket/key` of the host's `current`: the ETag it had when the host's heartbeat last
    /// confirmed running the version it names, and when that was (Unix seconds).
    #[serde(default)]
    confirmed: BTreeMap<String, (String, u64)>,
    /// When `present` was made exact for the host's `manifests/` and `objects/` by a listing
    /// (Unix seconds); `None`: never, or no longer to be trusted.
    #[serde(default)]
    listed: Option<u64>,
    /// A write of a key the index did not hold was begun and its publish has not committed
    /// (or failed): the key may be in the engine without being in `present`.
    #[serde(default)]
    pending: bool,
    /// `bucket/key` of keys whose delete was sent and not seen to succeed: maybe still in
    /// the engine, so never "present" (a version needing one stores it again), yet still
    /// in the listing (the next GC deletes it again).
    #[serde(default)]
    deleting: BTreeSet<String>,
}

/// One host's part, and whether it changed since it was loaded or saved.
#[derive(Debug)]
struct Part {
    saved: Saved,
    dirty: bool,
    /// `saved.pending` was set by this run, whose every write so far succeeded and was
    /// learned: its own listing still holds for it (a pending part loaded from disk does not).
    ours: bool,
}

/// The index, loaded host by host for one store.
#[derive(Debug)]
pub struct Index {
    state: Chroot,
    store: String,
    hosts: Mutex<BTreeMap<HostName, Part>>,
    /// Set by [`Index::begin_writing`] (a run holding the publish lock): only such a run
    /// writes the files.
    writing: AtomicBool,
}

impl Index {
    /// The index `state` keeps for `store` (empty for a host whose file is of another store,
    /// unreadable, or absent).
    pub fn load(state: &Chroot, store: &str) -> Self {
        Self {
            state: state.clone(),
            store: store.to_owned(),
            hosts: Mutex::new(BTreeMap::new()),
            writing: AtomicBool::new(false),
        }
    }

    /// Makes this the index of a run that writes (it holds the publish lock). A reader such
    /// as `bento status` never writes the files: having read a host's part before a publish
    /// deleted a key, it would bring the key back as "present".
    pub fn begin_writing(&self) -> Result<(), super::StoreError> {
        self.writing.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn file(&self, host: &HostName) -> PathBuf {
        self.state
            .state_dir()
            .join(INDEX_DIR)
            .join(format!("{}.json", host.as_str()))
    }

    /// Runs `f` on the host's part, read from its file on first use.
    fn with<T>(&self, host: &HostName, f: impl FnOnce(&mut Part) -> T) -> T {
        let mut hosts = self.hosts.lock().expect("not poisoned");
        let part = hosts.entry(host.clone()).or_insert_with(|| {
            let saved = std::fs::read(self.file(host))
                .ok()
                .and_then(|b| serde_json::from_slice::<Saved>(&b).ok())
                .filter(|i| i.store == self.store)
                .unwrap_or_else(|| Saved {
                    store: self.store.clone(),
                    ..Saved::default()
                });
            Part {
                saved,
                dirty: false,
                ours: false,
            }
        });
        f(part)
    }

    /// Writes the host's part if it changed (best effort: a lost index costs requests only).
    pub fn save_host(&self, host: &HostName) {
        let saved = {
            let mut hosts = self.hosts.lock().expect("not poisoned");
            match hosts.get_mut(host) {
                Some(part) if part.dirty => {
                    part.dirty = false;
                    part.saved.clone()
                }
                _ => return,
            }
        };
        self.write(host, &saved);
    }

    fn write(&self, host: &HostName, saved: &Saved) {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.state.state_dir();
        if !self.writing.load(Ordering::Relaxed) || !dir.is_dir() {
            return;
        }
        let path = self.file(host);
        let bytes = serde_json::to_vec(saved).expect("index serialises");
        let written = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join(INDEX_DIR))
            .and_then(|()| atomic::write_file(&path, &bytes, 0o600));
        if let Err(e) = written {
            tracing::warn!("cannot keep the S3 index {}: {e}", path.display());
        }
    }

    /// Writes every part that changed.
    pub fn save(&self) {
        let hosts: Vec<HostName> = self
            .hosts
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(_, p)| p.dirty)
            .map(|(h, _)| h.clone())
            .collect();
        for host in hosts {
            self.save_host(&host);
        }
    }

    pub fn known(&self, host: &HostName, full: &str) -> bool {
        self.with(host, |p| p.saved.present.contains(full))
    }

    /// Records a key as present (kept at the host's next save: until then, a loss costs a
    /// request).
    pub fn learn(&self, host: &HostName, full: String) {
        self.with(host, |p| p.dirty |= p.saved.present.insert(full));
    }

    /// Forgets a key about to be deleted, on disk before the delete is sent: a run killed
    /// after the delete must not leave an index that says the key is there.
    pub fn forget(&self, host: &HostName, full: &str) {
        let was = self.with(host, |p| {
            let was = p.saved.present.remove(full);
            if was {
                p.saved.deleting.insert(full.to_owned());
            }
            p.dirty |= was;
            was
        });
        if was {
            self.save_host(host);
        }
    }

    /// The delete of `full` succeeded (kept at the host's next save; until then, a run killed
    /// deletes it once more).
    pub fn deleted(&self, host: &HostName, full: &str) {
        self.with(host, |p| p.dirty |= p.saved.deleting.remove(full));
    }

    /// Whether the host's part is the whole of its `manifests/` and `objects/` at `now`: a
    /// run holding the publish lock, a listing younger than [`RELIST_SECS`] (not "from the
    /// future"), and no write begun since that did not commit (but this run's own, which
    /// it learned as each succeeded; one that failed drops the listing). Anything else writing to the
    /// host (another publisher, a restored store) shows as a `current` this index did not
    /// write or see, which drops the listing ([`Index::distrust`]).
    pub fn trusted(&self, host: &HostName, now: u64) -> bool {
        self.writing.load(Ordering::Relaxed)
            && self.with(host, |p| {
                (!p.saved.pending || p.ours)
                    && p.saved
                        .listed
                        .is_some_and(|at| at <= now && now - at < RELIST_SECS)
            })
    }

    /// The host's keys known present under `prefix` (`bucket/` and the host's prefix and
    /// area), when the part is [`Index::trusted`].
    pub fn listing(&self, host: &HostName, prefix: &str, now: u64) -> Option<Vec<String>> {
        if !self.trusted(host, now) {
            return None;
        }
        Some(self.with(host, |p| {
            let under = |set: &BTreeSet<String>| -> Vec<String> {
                set.range(prefix.to_owned()..)
                    .take_while(|k| k.starts_with(prefix))
                    .cloned()
                    .collect()
            };
            let mut keys = under(&p.saved.present);
            keys.extend(under(&p.saved.deleting));
            keys.sort();
            keys.dedup();
            keys
        }))
    }

    /// Makes the host's keys under each of `prefixes` exactly `listed` (a listing of the
    /// engine taken just now), trusted from `now` on. Kept at the host's next save.
    pub fn set_listing(&self, host: &HostName, prefixes: &[String], listed: Vec<String>, now: u64) {
        self.with(host, |p| {
            let outside = |k: &String| !prefixes.iter().any(|pre| k.starts_with(pre.as_str()));
            p.saved.present.retain(outside);
            p.saved.deleting.retain(outside);
            p.saved.present.extend(
                listed
                    .into_iter()
                    .filter(|k| prefixes.iter().any(|pre| k.starts_with(pre.as_str()))),
            );
            p.saved.listed = Some(now);
            p.saved.pending = false;
            p.ours = false;
            p.dirty = true;
        });
    }

    /// The host's listing is no longer to be trusted (something else wrote to the host).
    pub fn distrust(&self, host: &HostName) {
        self.with(host, |p| {
            p.dirty |= p.saved.listed.take().is_some();
        });
    }

    /// Called before `full` is written: when the index does not hold it yet and its listing
    /// is trusted, marks the host's part pending on disk first, so a run killed between the
    /// write and the commit leaves a part that sends the next publish to a listing.
    pub fn will_write(&self, host: &HostName, full: &str) {
        let marked = self.with(host, |p| {
            let mark =
                !p.saved.pending && p.saved.listed.is_some() && !p.saved.present.contains(full);
            if mark {
                p.saved.pending = true;
                p.ours = true;
                p.dirty = true;
            }
            mark
        });
        if marked {
            self.save_host(host);
        }
    }

    /// The host's publish committed (`current` switched): every key it wrote succeeded, and
    /// was learned, so the listing holds again.
    pub fn committed(&self, host: &HostName) {
        self.with(host, |p| {
            p.dirty |= std::mem::take(&mut p.saved.pending);
            p.ours = false;
        });
    }

    /// Whether `full` is absent by the host's trusted listing (no HEAD needed to know).
    pub fn absent(&self, host: &HostName, full: &str, now: u64) -> bool {
        self.trusted(host, now)
            && !self.with(host, |p| {
                p.saved.present.contains(full) || p.saved.deleting.contains(full)
            })
    }

    /// The text and ETag of `current` as last seen.
    pub fn current(&self, host: &HostName, full: &str) -> Option<(String, String)> {
        self.with(host, |p| p.saved.current.get(full).cloned())
    }

    /// Records `current`'s text and ETag (`None`: not known, or gone). A change forgets the
    /// host's confirmation: it was of the version `current` named before.
    pub fn set_current(&self, host: &HostName, full: &str, seen: Option<(String, String)>) {
        self.with(host, |p| {
            let changed = match seen {
                Some(entry) => {
                    p.saved.current.insert(full.to_owned(), entry.clone()) != Some(entry)
                }
                None => p.saved.current.remove(full).is_some(),
            };
            if changed {
                p.saved.confirmed.remove(full);
            }
            p.dirty |= changed;
        });
    }

    /// Whether the host confirmed the version `current` names while `current` had `etag`,
    /// less than [`CONFIRMATION_SECS`] before `now` (a confirmation "from the future", as
    /// after the publisher's clock went back, does not count).
    pub fn confirmed(&self, host: &HostName, full: &str, etag: &str, now: u64) -> bool {
        self.with(host, |p| {
            p.saved
                .confirmed
                .get(full)
                .is_some_and(|(e, at)| e == etag && *at <= now && now - at < CONFIRMATION_SECS)
        })
    }

    /// Records the host's confirmation of `current` at `etag`, if that is the ETag the index
    /// holds for it (an ETag this run did not get from the engine confirms nothing).
    pub fn confirm(&self, host: &HostName, full: &str, etag: &str, now: u64) {
        self.with(host, |p| {
            if p.saved.current.get(full).is_some_and(|(_, e)| e == etag) {
                let entry = (etag.to_owned(), now);
                p.dirty |= p.saved.confirmed.insert(full.to_owned(), entry.clone()) != Some(entry);
            }
        });
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
        let path = self.manifest_path(host, digest);
        let _ = std::fs::remove_file(path.with_extension(USES_EXT));
        let _ = std::fs::remove_file(path);
    }

    /// The objects a manifest of the host's uses, as recorded beside the publisher's copy of
    /// it (a format-2 version's trees walked once, never read back from the engine for GC).
    pub fn uses(&self, host: &HostName, digest: &Digest) -> Option<BTreeSet<Digest>> {
        let path = self.manifest_path(host, digest).with_extension(USES_EXT);
        let text = std::fs::read_to_string(path).ok()?;
        let mut lines = text.lines();
        // The first line names the manifest: a file copied beside another is not used.
        if lines.next()? != digest.to_hex() {
            return None;
        }
        lines.map(|l| l.parse().ok()).collect()
    }

    /// Records what a manifest uses (best effort: a lost record costs a walk of its trees).
    pub fn keep_uses(&self, host: &HostName, digest: &Digest, objects: &BTreeSet<Digest>) {
        let path = self.manifest_path(host, digest).with_extension(USES_EXT);
        let mut text = digest.to_hex();
        for d in objects {
            text.push('\n');
            text.push_str(&d.to_hex());
        }
        if path
            .parent()
            .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
        {
            let _ = atomic::write_file(&path, text.as_bytes(), 0o600);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alpha() -> HostName {
        HostName::new("alpha").unwrap()
    }

    /// A publisher's state directory, made.
    fn state() -> (tempfile::TempDir, Chroot) {
        let tmp = tempfile::tempdir().unwrap();
        let state = Chroot::new(tmp.path());
        std::fs::create_dir_all(state.state_dir()).unwrap();
        (tmp, state)
    }

    #[test]
    fn the_index_is_kept_per_store_and_never_trusted_for_content() {
        let (_tmp, state) = state();
        let index = Index::load(&state, "s3://a");
        index.begin_writing().unwrap();
        let alpha = alpha();
        index.learn(&alpha, "b/k".into());
        index.set_current(&alpha, "b/current", Some(("d\n".into(), "\"e1\"".into())));
        let d = Digest::of(b"manifest");
        index.keep_manifest(&alpha, &d, b"manifest");
        index.keep_manifest(&alpha, &Digest::of(b"x"), b"not x");
        index.save();
        let again = Index::load(&state, "s3://a");
        assert!(again.known(&alpha, "b/k"));
        assert_eq!(again.current(&alpha, "b/current").unwrap().1, "\"e1\"");
        assert_eq!(again.manifest(&alpha, &d, 100).unwrap(), b"manifest");
        assert!(again.manifest(&alpha, &Digest::of(b"x"), 100).is_none());
        // A copy changed on disk is not used.
        std::fs::write(again.manifest_path(&alpha, &d), b"tampered").unwrap();
        assert!(again.manifest(&alpha, &d, 100).is_none());
        // Another store's index is not this one's.
        assert!(!Index::load(&state, "s3://other").known(&alpha, "b/k"));
    }

    #[test]
    fn a_host_saved_when_it_commits_and_a_forgotten_key_at_once_survive_a_kill() {
        let (_tmp, state) = state();
        let (alpha, beta) = (alpha(), HostName::new("beta").unwrap());
        let index = Index::load(&state, "s3://a");
        index.begin_writing().unwrap();
        index.learn(&alpha, "b/alpha/o1".into());
        index.learn(&beta, "b/beta/o1".into());
        // Alpha's publish commits; beta's is killed before it does (no save, no drop).
        index.save_host(&alpha);
        index.forget(&alpha, "b/alpha/o1");
        std::mem::forget(index);
        let next = Index::load(&state, "s3://a");
        assert!(
            !next.known(&alpha, "b/alpha/o1"),
            "a deleted key is never claimed present"
        );
        assert!(
            !next.known(&beta, "b/beta/o1"),
            "only committed hosts were kept"
        );
        // Each host's file is whole JSON on its own.
        let file = state.state_dir().join(INDEX_DIR).join("alpha.json");
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(file).unwrap()).unwrap();
    }

    #[test]
    fn a_confirmation_holds_for_its_etag_within_a_day_and_a_new_current_voids_it() {
        let (_tmp, state) = state();
        let alpha = alpha();
        let index = Index::load(&state, "s3://a");
        index.begin_writing().unwrap();
        let now = 1_800_000_000;
        // An ETag the index never got from the engine confirms nothing.
        index.confirm(&alpha, "b/current", "\"e1\"", now);
        assert!(!index.confirmed(&alpha, "b/current", "\"e1\"", now));
        index.set_current(&alpha, "b/current", Some(("d1\n".into(), "\"e1\"".into())));
        index.confirm(&alpha, "b/current", "\"e1\"", now);
        index.save();
        let again = Index::load(&state, "s3://a");
        let ok = |etag: &str, at: u64| again.confirmed(&alpha, "b/current", etag, at);
        assert!(ok("\"e1\"", now) && ok("\"e1\"", now + CONFIRMATION_SECS - 1));
        assert!(!ok("\"e2\"", now), "another `current`");
        assert!(!ok("\"e1\"", now + CONFIRMATION_SECS), "expired");
        assert!(!ok("\"e1\"", now - 1), "from the future");
        // The same `current` read again keeps it; a new one forgets it for good.
        again.set_current(&alpha, "b/current", Some(("d1\n".into(), "\"e1\"".into())));
        assert!(ok("\"e1\"", now));
        again.set_current(&alpha, "b/current", Some(("d2\n".into(), "\"e2\"".into())));
        again.set_current(&alpha, "b/current", Some(("d1\n".into(), "\"e1\"".into())));
        assert!(!ok("\"e1\"", now));
    }

    #[test]
    fn a_listing_stands_in_for_the_engine_only_while_every_write_since_committed() {
        let (_tmp, state) = state();
        let alpha = alpha();
        let areas = [
            "b/alpha/manifests/".to_owned(),
            "b/alpha/objects/".to_owned(),
        ];
        let index = Index::load(&state, "s3://a");
        index.begin_writing().unwrap();
        let now = 1_800_000_000;
        assert!(!index.trusted(&alpha, now), "never listed");
        index.learn(&alpha, "b/alpha/objects/gone".into());
        index.set_listing(
            &alpha,
            &areas,
            vec![
                "b/alpha/objects/o1".into(),
                "b/alpha/manifests/m1.json".into(),
            ],
            now,
        );
        assert_eq!(
            index.listing(&alpha, &areas[1], now).unwrap(),
            ["b/alpha/objects/o1"],
            "the listing replaces what the index held"
        );
        assert!(index.absent(&alpha, "b/alpha/objects/o2", now));
        assert!(!index.absent(&alpha, "b/alpha/objects/o1", now));
        index.save();

        // A write of a new key is marked on disk before it is sent: killed before the commit,
        // the next run lists again.
        index.will_write(&alpha, "b/alpha/objects/o2");
        index.learn(&alpha, "b/alpha/objects/o2".into());
        assert!(
            index.trusted(&alpha, now),
            "this run's own writes are in it"
        );
        std::mem::forget(index);
        let next = Index::load(&state, "s3://a");
        next.begin_writing().unwrap();
        assert!(!next.trusted(&alpha, now), "a killed write is not trusted");
        // The commit makes it hold again, with what was written.
        next.committed(&alpha);
        assert!(next.trusted(&alpha, now));
        assert_eq!(
            next.listing(&alpha, &areas[1], now).unwrap(),
            ["b/alpha/objects/o1"]
        );
        // Rewriting a key it holds marks nothing.
        next.will_write(&alpha, "b/alpha/objects/o1");
        assert!(next.trusted(&alpha, now));
        // A key being deleted may still be there: listed (GC deletes it again), never known
        // present nor absent (a version needing it asks the engine), until its delete is seen.
        next.forget(&alpha, "b/alpha/objects/o1");
        std::mem::forget(next);
        let next = Index::load(&state, "s3://a");
        next.begin_writing().unwrap();
        assert_eq!(
            next.listing(&alpha, &areas[1], now).unwrap(),
            ["b/alpha/objects/o1"]
        );
        assert!(!next.known(&alpha, "b/alpha/objects/o1"));
        assert!(!next.absent(&alpha, "b/alpha/objects/o1", now));
        next.deleted(&alpha, "b/alpha/objects/o1");
        assert!(next.listing(&alpha, &areas[1], now).unwrap().is_empty());
        assert!(next.absent(&alpha, "b/alpha/objects/o1", now));
        // Expired, from the future, distrusted, or in a run that does not write: not used.
        assert!(!next.trusted(&alpha, now + RELIST_SECS));
        assert!(!next.trusted(&alpha, now - 1));
        assert!(Index::load(&state, "s3://a")
            .listing(&alpha, &areas[1], now)
            .is_none());
        next.distrust(&alpha);
        assert!(!next.trusted(&alpha, now) && !next.absent(&alpha, "b/alpha/objects/o9", now));
    }

    #[test]
    fn what_a_manifest_uses_is_read_back_only_for_that_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let state = Chroot::new(tmp.path());
        let alpha = alpha();
        let index = Index::load(&state, "s3://a");
        let (m1, m2) = (Digest::of(b"m1"), Digest::of(b"m2"));
        let objects = BTreeSet::from([Digest::of(b"o1"), Digest::of(b"o2")]);
        assert_eq!(index.uses(&alpha, &m1), None);
        index.keep_uses(&alpha, &m1, &objects);
        assert_eq!(index.uses(&alpha, &m1), Some(objects));
        // A record copied beside another manifest is not that manifest's.
        let path = |d: &Digest| index.manifest_path(&alpha, d).with_extension(USES_EXT);
        std::fs::copy(path(&m1), path(&m2)).unwrap();
        assert_eq!(index.uses(&alpha, &m2), None);
        index.drop_manifest(&alpha, &m1);
        assert_eq!(index.uses(&alpha, &m1), None);
    }

    #[test]
    fn a_reader_never_writes_the_index_a_publish_keeps() {
        let (_tmp, state) = state();
        let alpha = alpha();
        let first = Index::load(&state, "s3://a");
        first.begin_writing().unwrap();
        first.learn(&alpha, "b/alpha/o1".into());
        first.save_host(&alpha);
        drop(first);
        // A reader (`bento status`) loads alpha's part, then a publish deletes the object.
        let reader = Index::load(&state, "s3://a");
        assert!(reader.known(&alpha, "b/alpha/o1"));
        let publish = Index::load(&state, "s3://a");
        publish.begin_writing().unwrap();
        publish.forget(&alpha, "b/alpha/o1");
        drop(publish);
        // The reader ends last: what it saves must not bring the object back.
        reader.set_current(&alpha, "b/current", Some(("d\n".into(), "\"e2\"".into())));
        reader.save();
        drop(reader);
        assert!(!Index::load(&state, "s3://a").known(&alpha, "b/alpha/o1"));
    }
}
