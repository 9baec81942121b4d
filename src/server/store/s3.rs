//! [`S3Store`]: the hosts' areas in an S3-compatible object store (docs/objectstore.md),
//! one prefix or one bucket per host, the keys inside it the chroot's byte for byte. There is
//! no rename: objects and `cache/` files are PUT whole first, then the manifest and its
//! signature, and `current` last as a conditional PUT (`If-Match` on the ETag read at the
//! start, `If-None-Match: *` on a first publish), so a lost race changes nothing it names.
//!
//! Invariants: nothing here writes a host-written key (`logs/`) or deletes `current`; an
//! object's bytes are checked against its digest before they are sent; an object or a
//! shared `cache/` file another host already holds in this run is copied inside the engine
//! (CopyObject), not sent again; the publisher's lock and state stay local (`state`), never
//! in the store.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

mod copies;
mod current;
mod listing;

use super::s3index::Index;
use super::s3logs::ReportCache;
use super::{
    read_verified, Area, Capabilities, Cas, Key, LogEntry, LogsError, OpenObject, Store,
    StoreError, StoreLock, Version,
};
use crate::protocol::layout::{self, Chroot, LOGS};
use crate::protocol::manifest::{Digest, MAX_OBJECT_BYTES};
use crate::protocol::HostName;
use crate::sys::atomic;
use crate::sys::s3::{Client, Got, Location, PutMode, S3Error, HOST_PLACEHOLDER};

/// The longest `current` read (one line; anything longer counts by its head).
const MAX_CURRENT_BYTES: u64 = 4096;
impl Drop for S3Store {
    fn drop(&mut self) {
        self.index.save();
    }
}

/// `current`'s bytes and version.
type Current = (Vec<u8>, Version);

/// The object store, as the publisher writes it.
pub struct S3Store {
    client: Client,
    /// The `[server] store` template (`{host}` in the bucket or the prefix).
    files: Location,
    /// The `[server] reports` template, when hosts write their `logs/` elsewhere.
    reports: Option<Location>,
    /// The publisher's own, local state (the lock).
    state: Chroot,
    /// The fleet's hosts: a bucket-per-host layout cannot be listed for them.
    known: Vec<HostName>,
    /// Probed at the first lock when not known from the publisher's state.
    cas: Mutex<Cas>,
    /// What the publisher knows is in the engine, kept in its state.
    index: Index,
    /// The hosts' newest reports as last read, for conditional GETs.
    reports_cache: ReportCache,
    /// Objects a HEAD of this run found absent, so storing one asks no second time.
    absent: Mutex<std::collections::BTreeSet<String>>,
    /// `current` as this run last read or wrote it, per host (`None`: absent): publish reads
    /// it when it plans and again when it switches, and the switch's compare-and-swap (or,
    /// where the engine ignores it, a fresh read) catches a change in between.
    seen: Mutex<BTreeMap<HostName, Option<Current>>>,
    /// Where this run already stored a shared file (a key's bytes, by content), so the next
    /// host gets a server-side copy (and waits for the first host's upload to get it).
    copies: copies::Copies,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("files", &self.files.to_string())
            .finish_non_exhaustive()
    }
}

fn s3_err(e: S3Error) -> StoreError {
    match e {
        S3Error::TooLarge { target, limit } => StoreError::TooLarge {
            at: PathBuf::from(format!("s3://{}/{}", target.bucket, target.key)),
            max: limit,
        },
        other => StoreError::S3(Box::new(other)),
    }
}

impl S3Store {
    pub fn new(
        client: Client,
        files: Location,
        reports: Option<Location>,
        state: Chroot,
        known: Vec<HostName>,
    ) -> Self {
        Self {
            client,
            reports,
            known,
            cas: Mutex::new(Cas::Unknown),
            copies: Default::default(),
            absent: Mutex::new(Default::default()),
            seen: Mutex::new(BTreeMap::new()),
            index: Index::load(&state, &files.to_string()),
            reports_cache: ReportCache::new(&state, &files.to_string()),
            files,
            state,
        }
    }

    /// What `bento server check` found the engine does with conditional writes.
    pub fn with_cas(self, cas: Cas) -> Self {
        *self.cas.lock().expect("not poisoned") = cas;
        self
    }

    fn cas(&self) -> Cas {
        *self.cas.lock().expect("not poisoned")
    }

    /// Probes the engine's conditional writes (at the first host's location), records the
    /// answer in the publisher's state and returns it.
    pub fn probe(&self) -> Result<Cas, StoreError> {
        let Some(host) = self.hosts()?.into_iter().next() else {
            return Ok(Cas::Unknown);
        };
        let cas = super::probe::probe(&self.client, &self.files, &host).map_err(s3_err)?;
        if let Err(e) = super::probe::record(&self.state, cas) {
            tracing::warn!(
                "cannot record the conditional-write probe in {}: {e}",
                self.state.state_dir().display()
            );
        }
        *self.cas.lock().expect("not poisoned") = cas;
        Ok(cas)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The host's location (`{host}` replaced).
    pub fn host_location(&self, host: &HostName) -> Result<Location, StoreError> {
        self.files
            .for_host(host.as_str())
            .map_err(|e| StoreError::S3Location(e.to_string()))
    }

    /// Where the host's `logs/` are: `[server] reports`, else `<host's prefix>/logs`.
    fn logs_location(&self, host: &HostName) -> Result<Location, LogsError> {
        let bad = |e: crate::sys::s3::LocationError| LogsError::Io {
            path: PathBuf::from(self.files.to_string()),
            source: io::Error::other(e.to_string()),
        };
        match &self.reports {
            Some(r) => r.for_host(host.as_str()).map_err(bad),
            None => {
                let l = self.files.for_host(host.as_str()).map_err(bad)?;
                Ok(Location {
                    prefix: l.key(LOGS),
                    ..l
                })
            }
        }
    }

    fn at(&self, host: &HostName, key: &Key) -> Result<(Location, String), StoreError> {
        let l = self.host_location(host)?;
        let k = l.key(&key.path());
        Ok((l, k))
    }

    /// Copies `from` (another host's key of the same content) to `bucket/key` inside the
    /// engine; `false` when the copy was refused (the caller sends the bytes instead).
    fn copy_from(&self, from: Option<&copies::Place>, bucket: &str, key: &str) -> bool {
        let Some((src_bucket, src_key)) = from else {
            return false;
        };
        match self.client.copy(src_bucket, src_key, bucket, key) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("server-side copy to s3://{bucket}/{key} failed, sending: {e}");
                false
            }
        }
    }
}

impl Store for S3Store {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_replace: true,
            compare_and_swap: self.cas(),
            server_side_copy: true,
        }
    }

    fn locate(&self, host: &HostName, key: &Key) -> PathBuf {
        match self.at(host, key) {
            Ok((l, k)) => PathBuf::from(format!("s3://{}/{k}", l.bucket)),
            Err(_) => PathBuf::from(format!("{}: {host}/{}", self.files, key.path())),
        }
    }

    /// The lock is the publisher's, in its local state directory: it guards `current`
    /// wherever the engine ignores conditional writes, for publishers sharing that state.
    fn lock(&self, on_wait: Box<dyn FnOnce() + '_>) -> Result<StoreLock, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.state.state_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| StoreError::Io {
                at: dir.clone(),
                source,
            })?;
        let path = self.state.lock_path();
        let lock = atomic::Lock::acquire(&path, on_wait)
            .map_err(|source| StoreError::Io { at: path, source })?;
        self.index.begin_writing()?;
        if self.cas() == Cas::Unknown {
            match self.probe()? {
                Cas::Ignored => tracing::warn!(
                    "{}: the engine ignores conditional writes; only this publisher's lock guards `current` (one publisher at a time)",
                    self.files.endpoint
                ),
                cas => tracing::debug!("conditional writes: {cas:?}"),
            }
        }
        Ok(StoreLock::new(lock))
    }

    fn hosts(&self) -> Result<Vec<HostName>, StoreError> {
        if self.files.bucket_per_host() {
            return Ok(self.known.clone());
        }
        // One listing of the prefix above `{host}`; each key names its host in the segment
        // where `{host}` stands.
        let (before, _) = self
            .files
            .prefix
            .split_once(HOST_PLACEHOLDER)
            .unwrap_or((self.files.prefix.as_str(), ""));
        let listed = self
            .client
            .list(&self.files.bucket, before)
            .map_err(s3_err)?;
        let mut hosts: Vec<HostName> = listed
            .iter()
            .filter_map(|l| l.key.strip_prefix(before))
            .filter_map(|rest| rest.split('/').next())
            .filter_map(|name| HostName::new(name).ok())
            .collect();
        hosts.extend(self.known.iter().cloned());
        hosts.sort();
        hosts.dedup();
        Ok(hosts)
    }

    fn open_host(&self, host: &HostName) -> Result<(), StoreError> {
        // Buckets and identities are the operator's (`bento server s3-policy`); a
        // prefix needs nothing. Only the name is checked here.
        self.host_location(host).map(|_| ())
    }

    fn get(&self, host: &HostName, key: &Key, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if key.host_written() {
            return Err(StoreError::WrongOperation(key.path()));
        }
        match key {
            Key::Manifest(d) => {
                if let Some(bytes) = self.index.manifest(host, d, limit) {
                    return Ok(Some(bytes));
                }
            }
            // Asked with its last ETag (`bento status` reads every host's).
            Key::Current if limit >= MAX_CURRENT_BYTES => {
                return Ok(self.fetch_current(host)?.map(|(bytes, _)| bytes))
            }
            _ => {}
        }
        let (l, k) = self.at(host, key)?;
        match self
            .client
            .get(&l.bucket, &k, limit, None)
            .map_err(s3_err)?
        {
            Got::Body { bytes, .. } => {
                if let Key::Manifest(d) = key {
                    self.index.keep_manifest(host, d, &bytes);
                }
                Ok(Some(bytes))
            }
            Got::NotFound | Got::NotModified => Ok(None),
        }
    }

    fn get_prefix(
        &self,
        host: &HostName,
        key: &Key,
        len: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        if key.host_written() {
            return Err(StoreError::WrongOperation(key.path()));
        }
        // A manifest never changes: the publisher's checked copy serves its head.
        if let Key::Manifest(d) = key {
            if let Some(mut bytes) = self.index.manifest(host, d, u64::MAX) {
                bytes.truncate(len as usize);
                return Ok(Some(bytes));
            }
        }
        let (l, k) = self.at(host, key)?;
        let mut out = Vec::new();
        Ok(self
            .client
            .get_range(&l.bucket, &k, 0, len, &mut out)
            .map_err(s3_err)?
            .map(|_| out))
    }

    fn exists(&self, host: &HostName, key: &Key) -> Result<bool, StoreError> {
        let (l, k) = self.at(host, key)?;
        let full = format!("{}/{k}", l.bucket);
        let immutable = matches!(key, Key::Manifest(_) | Key::Signature(_) | Key::Object(_));
        if immutable && self.index.known(host, &full) {
            return Ok(true);
        }
        let there = self.client.head(&l.bucket, &k).map_err(s3_err)?.is_some();
        if immutable && there {
            self.index.learn(host, full);
        } else if matches!(key, Key::Object(_)) && !there {
            self.absent.lock().expect("not poisoned").insert(full);
        }
        Ok(there)
    }

    fn list(&self, host: &HostName, area: Area) -> Result<Vec<Key>, StoreError> {
        self.list_area(host, area)
    }

    fn put(&self, host: &HostName, key: &Key, bytes: &[u8]) -> Result<(), StoreError> {
        match key {
            Key::Manifest(_) | Key::Signature(_) | Key::Fresh(_) | Key::Cache(_) => {}
            _ => return Err(StoreError::WrongOperation(key.path())),
        }
        let (l, k) = self.at(host, key)?;
        let full = format!("{}/{k}", l.bucket);
        let listed = matches!(key, Key::Manifest(_) | Key::Signature(_) | Key::Fresh(_));
        if listed {
            self.index.will_write(host, &full);
        }
        self.client
            .put(&l.bucket, &k, bytes, PutMode::Overwrite)
            .map_err(|e| {
                // It may have landed all the same.
                self.index.distrust(host);
                s3_err(e)
            })?;
        if listed {
            self.index.learn(host, full);
        }
        if let Key::Manifest(d) = key {
            self.index.keep_manifest(host, d, bytes);
        }
        Ok(())
    }

    /// An object this run already stored for another host is copied without asking first
    /// whether this host holds it: the copy costs one request, as the question would (and
    /// rewrites a key that held it with the same bytes). Otherwise a HEAD (unless the
    /// index knows, this run just found it absent, or the host's trusted listing lacks it),
    /// then the bytes.
    fn put_object(
        &self,
        host: &HostName,
        digest: &Digest,
        open: OpenObject<'_>,
    ) -> Result<Option<u64>, StoreError> {
        let key = Key::Object(*digest);
        let (l, k) = self.at(host, &key)?;
        let full = format!("{}/{k}", l.bucket);
        if self.index.known(host, &full) {
            return Ok(None);
        }
        let seen_absent = self.absent.lock().expect("not poisoned").remove(&full)
            || self.index.absent(host, &full, current::unix_now());
        self.index.will_write(host, &full);
        let content = format!("object:{}", digest.to_hex());
        let stored = || Some((l.bucket.clone(), k.clone()));
        let placed = self
            .copies
            .place(&content, |from| {
                if self.copy_from(from, &l.bucket, &k) {
                    return Ok((Some(0), None));
                }
                if !seen_absent && self.exists(host, &key)? {
                    return Ok((None, None));
                }
                self.absent.lock().expect("not poisoned").remove(&full);
                // Read whole and checked before anything is sent: the engine never holds an
                // object whose bytes are not its digest's.
                let bytes =
                    read_verified(open, digest, MAX_OBJECT_BYTES + 1, self.locate(host, &key))?;
                let n = bytes.len() as u64;
                self.client
                    .put(&l.bucket, &k, &bytes, PutMode::Overwrite)
                    .map_err(s3_err)?;
                Ok((Some(n), stored()))
            })
            .inspect_err(|_: &StoreError| self.index.distrust(host))?;
        self.index.learn(host, full);
        Ok(placed)
    }

    fn put_shared(&self, host: &HostName, key: &Key, pooled: &Path) -> Result<bool, StoreError> {
        let bytes = super::shared_bytes(key, pooled)?;
        let (l, k) = self.at(host, key)?;
        // NAR names are their content's hash: the same size is the same file. A narinfo
        // (small) may be re-signed under its name: compared whole.
        let is_nar = !k.ends_with(".narinfo");
        match self.client.head(&l.bucket, &k).map_err(s3_err)? {
            Some(h) if is_nar && h.size == bytes.len() as u64 => return Ok(false),
            Some(h) if h.size == bytes.len() as u64 => {
                let limit = bytes.len() as u64;
                if let Got::Body { bytes: there, .. } = self
                    .client
                    .get(&l.bucket, &k, limit, None)
                    .map_err(s3_err)?
                {
                    if there == bytes {
                        return Ok(false);
                    }
                }
            }
            _ => {}
        }
        let content = format!("cache:{}", Digest::of(&bytes).to_hex());
        self.copies.place::<(), StoreError>(&content, |from| {
            if self.copy_from(from, &l.bucket, &k) {
                return Ok(((), None));
            }
            self.client
                .put(&l.bucket, &k, &bytes, PutMode::Overwrite)
                .map_err(s3_err)?;
            Ok(((), Some((l.bucket.clone(), k.clone()))))
        })?;
        Ok(true)
    }

    fn delete(&self, host: &HostName, key: &Key) -> Result<(), StoreError> {
        if key.host_written() || *key == Key::Current {
            return Err(StoreError::WrongOperation(key.path()));
        }
        let (l, k) = self.at(host, key)?;
        // Forgotten first, on disk: a delete that fails (or a run killed) after the engine
        // removed the key must not leave it "known present".
        let full = format!("{}/{k}", l.bucket);
        self.index.forget(host, &full);
        if let Key::Manifest(d) = key {
            self.index.drop_manifest(host, d);
        }
        match self.client.delete(&l.bucket, &k) {
            Ok(()) => {
                self.index.deleted(host, &full);
                Ok(())
            }
            // It may still be there: the index keeps it as "being deleted" (listed, never
            // "present"), so the next collection deletes it again.
            Err(e) => Err(s3_err(e)),
        }
    }

    fn current(&self, host: &HostName) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
        if let Some(seen) = self.seen.lock().expect("not poisoned").get(host) {
            return Ok(seen.clone());
        }
        let now = self.fetch_current(host)?;
        self.seen
            .lock()
            .expect("not poisoned")
            .insert(host.clone(), now.clone());
        Ok(now)
    }

    fn remembered_current(&self, host: &HostName) -> Option<(Vec<u8>, Version)> {
        self.current_remembered(host)
    }

    fn switch_current(
        &self,
        host: &HostName,
        to: &Digest,
        from: Option<&Version>,
    ) -> Result<(), StoreError> {
        let (l, k) = self.at(host, &Key::Current)?;
        if self.cas() != Cas::Honoured {
            // The engine may ignore the condition: compare first (under the publisher's
            // lock), and send the condition anyway.
            let now = self.fetch_current(host)?.map(|(_, v)| v);
            if now.as_ref() != from {
                return Err(StoreError::Raced { host: host.clone() });
            }
        }
        let mode = match from {
            None => PutMode::Create,
            Some(v) => PutMode::Replace(&v.0),
        };
        let text = layout::current_text(to);
        match self.client.put(&l.bucket, &k, text.as_bytes(), mode) {
            Ok(etag) => {
                let full = format!("{}/{k}", l.bucket);
                match &etag {
                    Some(e) => self.seen.lock().expect("not poisoned").insert(
                        host.clone(),
                        Some((text.clone().into_bytes(), Version(e.clone()))),
                    ),
                    None => self.seen.lock().expect("not poisoned").remove(host),
                };
                self.index.set_current(host, &full, etag.map(|e| (text, e)));
                self.index.committed(host);
                // The host's publish commits here: its index is kept now, so a run killed
                // at the next host loses nothing of this one's.
                self.index.save_host(host);
                Ok(())
            }
            Err(S3Error::PreconditionFailed { .. }) => {
                self.seen.lock().expect("not poisoned").remove(host);
                // Another publisher wrote `current`: what else it wrote is not indexed.
                self.index.distrust(host);
                Err(StoreError::Raced { host: host.clone() })
            }
            Err(e) => Err(s3_err(e)),
        }
    }

    /// Nothing is shared inside the engine: a server-side copy is a copy.
    fn collect_shared(&self) -> Result<usize, StoreError> {
        Ok(0)
    }

    fn list_logs(&self, host: &HostName, dir: Option<&str>) -> Result<Vec<LogEntry>, LogsError> {
        super::s3logs::list(&self.client, &self.logs_location(host)?, dir)
    }

    fn read_log(
        &self,
        host: &HostName,
        dir: Option<&str>,
        name: &str,
    ) -> Result<Vec<u8>, LogsError> {
        super::s3logs::read(&self.client, &self.logs_location(host)?, dir, name)
    }

    /// A conditional GET with the ETag of the publisher's cached copy (a 304 reuses it),
    /// and the engine's `Last-Modified` as the time received.
    fn read_log_received(
        &self,
        host: &HostName,
        name: &str,
    ) -> Result<(Vec<u8>, Option<SystemTime>), LogsError> {
        let l = self.logs_location(host)?;
        super::s3logs::read_received(&self.client, &l, &self.reports_cache, host, name)
    }

    fn confirmed(&self, host: &HostName, version: &Version) -> bool {
        self.current_confirmed(host, version)
    }

    fn confirm(&self, host: &HostName, version: &Version) {
        self.confirm_current(host, version);
    }

    fn uses(
        &self,
        host: &HostName,
        manifest: &Digest,
    ) -> Option<std::collections::BTreeSet<Digest>> {
        self.index.uses(host, manifest)
    }

    fn keep_uses(
        &self,
        host: &HostName,
        manifest: &Digest,
        objects: &std::collections::BTreeSet<Digest>,
    ) {
        self.index.keep_uses(host, manifest, objects);
    }
}
