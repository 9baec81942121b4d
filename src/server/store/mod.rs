//! The server's side of the protocol as one small trait: everything publish, rollback,
//! GC, status and log do to a host's area goes through [`Store`], keyed by host and by the
//! protocol's [`Key`] (the chroot's relative paths, byte for byte), never by a path. The
//! invariant every implementation keeps: `current` is switched last and only from the
//! version the caller read, so a reader never sees a `current` whose manifest or objects
//! are missing. The chroot is one implementation ([`ChrootStore`]), the in-memory
//! [`MemStore`] serves the unit tests; [`S3Store`] is an object store's.

mod chroot;
mod hostdir;
mod mem;
mod pool;
pub mod probe;
mod reader;
mod reuse;
mod s3;
mod s3index;
mod s3logs;
#[cfg(test)]
mod tests;
pub mod trees;

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub use chroot::ChrootStore;
pub use mem::{Faulty, MemStore};
pub use reader::{HostRead, HostReader};
pub use s3::S3Store;

pub use crate::protocol::layout::{Area, Key, SubPath};
use crate::protocol::manifest::Digest;
use crate::protocol::HostName;
pub use crate::server::logs::{LogEntry, LogsError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Same text as the path-based errors it replaces: where, then what.
    #[error("{at}: {source}")]
    Io { at: PathBuf, source: io::Error },
    #[error(transparent)]
    Chroot(#[from] crate::server::chroot::ChrootError),
    #[error("chroot path {path}: {problem}; OpenSSH refuses a ChrootDirectory whose every component is not root-owned and unwritable by group and others")]
    UnsafeChrootPath { path: PathBuf, problem: String },
    /// The bytes handed over do not hash to the object's digest (changed since the scan).
    #[error("{0}: the bytes do not hash to the object's digest")]
    DigestMismatch(Digest),
    #[error("{at}: larger than {max} bytes")]
    TooLarge { at: PathBuf, max: u64 },
    /// A compare-and-swap of `current` found another version than the one read.
    #[error("{host}: another publish won (current changed since it was read); nothing else was switched")]
    Raced { host: HostName },
    #[error("{0}: a store writes this key only through its own operation")]
    WrongOperation(String),
    #[error(transparent)]
    S3(Box<crate::sys::s3::S3Error>),
    #[error("[server] store: {0}")]
    S3Location(String),
}

/// How a store honours the compare-and-swap of `current`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cas {
    /// A switch from a stale version fails with [`StoreError::Raced`].
    Honoured,
    /// The engine accepts the condition and ignores it: the publish lock is the only guard.
    Ignored,
    /// Not probed yet.
    Unknown,
}

/// What a store can promise; callers ask instead of special-casing a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// A put replaces the whole value at once (a rename; an object store's PUT).
    pub atomic_replace: bool,
    pub compare_and_swap: Cas,
    /// An object already stored for one host is made another's without sending its bytes
    /// again (the chroot's hard links to its pool, an object store's CopyObject).
    pub server_side_copy: bool,
}

/// An opaque version of `current` (the chroot: its bytes; an object store: its ETag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version(pub String);

/// The publish lock, held until dropped.
pub struct StoreLock(#[allow(dead_code)] Box<dyn Send>);

impl StoreLock {
    pub fn new(held: impl Send + 'static) -> Self {
        Self(Box::new(held))
    }
}

/// Opens an object's bytes, only when the store needs them ("already there" costs no read).
pub type OpenObject<'a> = &'a (dyn Fn() -> io::Result<Box<dyn Read>> + Sync + 'a);

/// The protocol's operations on the hosts' areas. Mutating operations are `open_host`,
/// `put`, `put_object`, `delete`, `switch_current` and `collect_shared`; a failed one
/// changes nothing a reader can see.
pub trait Store: Send + Sync {
    fn capabilities(&self) -> Capabilities;
    /// Where `key` of `host` is, for messages (the chroot: its path).
    fn locate(&self, host: &HostName, key: &Key) -> PathBuf;
    /// Takes the publish lock (`on_wait` is called when another holder makes it wait), and
    /// readies the store for writing.
    fn lock(&self, on_wait: Box<dyn FnOnce() + '_>) -> Result<StoreLock, StoreError>;
    /// The hosts with an area in the store.
    fn hosts(&self) -> Result<Vec<HostName>, StoreError>;
    /// Readies the host's area for a publish (the chroot: its directories, owners, modes).
    fn open_host(&self, host: &HostName) -> Result<(), StoreError>;
    /// All of `key`, `None` when absent; more than `limit` bytes is `TooLarge`.
    fn get(&self, host: &HostName, key: &Key, limit: u64) -> Result<Option<Vec<u8>>, StoreError>;
    /// The first `len` bytes of `key` (all of it when shorter), `None` when absent: a
    /// ranged read, for what needs only a value's head.
    fn get_prefix(
        &self,
        host: &HostName,
        key: &Key,
        len: u64,
    ) -> Result<Option<Vec<u8>>, StoreError>;
    fn exists(&self, host: &HostName, key: &Key) -> Result<bool, StoreError>;
    /// The keys in one area of the host's, in key order; names that are no key are skipped.
    fn list(&self, host: &HostName, area: Area) -> Result<Vec<Key>, StoreError>;
    /// Writes a manifest, signature or `cache/` file whole (never `current`, an object or
    /// a host-written key).
    fn put(&self, host: &HostName, key: &Key, bytes: &[u8]) -> Result<(), StoreError>;
    /// Stores object `digest` for `host` from `open`, verified against the digest, unless
    /// the host holds it already: `None` when it did (and `open` was not called), else the
    /// bytes sent (`0` for one shared without sending it again: a hard link, a copy).
    fn put_object(
        &self,
        host: &HostName,
        digest: &Digest,
        open: OpenObject<'_>,
    ) -> Result<Option<u64>, StoreError>;
    /// Lets the writes that follow (objects, manifests, signatures, stamps) wait for
    /// `batch` to be committed, which makes them durable together and only then gives them
    /// their names (the chroot: two `syncfs` for the whole run instead of fsyncs per file);
    /// `switch_current` of a version written so may only follow that commit. A store whose
    /// every write is durable when it returns (an object store) ignores it. Returns
    /// whether the store joined.
    fn join_batch(&self, _batch: std::sync::Arc<crate::sys::batch::Batch>) -> bool {
        false
    }
    /// The objects the host holds, when the store can tell them all at once more cheaply
    /// than `put_object` asks about each (the chroot: one listing of `objects/` instead of
    /// a lookup per object); `None` leaves the check to `put_object`.
    fn held_objects(
        &self,
        _host: &HostName,
    ) -> Result<Option<std::collections::BTreeSet<Digest>>, StoreError> {
        Ok(None)
    }
    /// Makes `cache/` file `key` of `host` hold the bytes of `pooled`, a file of the
    /// publisher's own pool that many hosts share (the chroot hard-links it; an object store
    /// uploads it once and copies it server-side to the next host). Returns whether the key
    /// changed.
    fn put_shared(&self, host: &HostName, key: &Key, pooled: &Path) -> Result<bool, StoreError>;
    /// Removes `key`; an absent key is no error.
    fn delete(&self, host: &HostName, key: &Key) -> Result<(), StoreError>;
    /// The bytes of `current` and their version, `None` when there is none.
    fn current(&self, host: &HostName) -> Result<Option<(Vec<u8>, Version)>, StoreError>;
    /// `current` as this publisher last wrote or read it, without asking, when a switch
    /// from it fails on its own if that is no longer so (the engine honours the condition)
    /// and the store knows every key of the host since. A host that gets a new version
    /// anyway is then spared reading `current` first; a wrong guess costs only the lost
    /// switch, after which the publish reads it (`server::publish` retries the host once).
    /// `None` (the default): read it.
    fn remembered_current(&self, _host: &HostName) -> Option<(Vec<u8>, Version)> {
        None
    }
    /// Makes `current` name `to`, if it is still `from` (`None`: it must not exist).
    fn switch_current(
        &self,
        host: &HostName,
        to: &Digest,
        from: Option<&Version>,
    ) -> Result<(), StoreError>;
    /// Frees what is shared between hosts and no longer used (the chroot's pool); returns
    /// how many entries went.
    fn collect_shared(&self) -> Result<usize, StoreError>;
    /// Says the publish holding the lock ended with nothing of it half-done: each file it
    /// wrote has its name or is gone. The chroot then spares the next lock holder its
    /// sweep of every host's temporary files. The default: nothing to spare.
    fn end_clean(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Lists what the host wrote in `logs/` (or `logs/<dir>/`), never following links.
    fn list_logs(&self, host: &HostName, dir: Option<&str>) -> Result<Vec<LogEntry>, LogsError>;
    /// Reads `logs/<name>` (or `logs/<dir>/<name>`), bounded, never following links.
    fn read_log(
        &self,
        host: &HostName,
        dir: Option<&str>,
        name: &str,
    ) -> Result<Vec<u8>, LogsError>;
    /// Reads `logs/<name>` as `read_log` does, with when the store received it by the
    /// store's clock, when the read itself tells (an object store's `Last-Modified`, the
    /// chroot's modification time); `None` sends the caller to `list_logs` for it.
    fn read_log_received(
        &self,
        host: &HostName,
        name: &str,
    ) -> Result<(Vec<u8>, Option<std::time::SystemTime>), LogsError> {
        self.read_log(host, None, name).map(|bytes| (bytes, None))
    }
    /// Whether this publisher saw the host's heartbeat confirm the version `current` names,
    /// while `current` was at `version`, recently enough to spare reading the heartbeat again
    /// (`server::publish::serial::numbered_last` says why that is safe). By default never:
    /// a store whose heartbeat read is cheap (the chroot's local file) reads it every time.
    fn confirmed(&self, _host: &HostName, _version: &Version) -> bool {
        false
    }
    /// Remembers that the host's heartbeat confirmed the version `current` names at
    /// `version` (kept by a run holding the publish lock; forgotten when `current` changes).
    fn confirm(&self, _host: &HostName, _version: &Version) {}
    /// The objects the host's manifest `manifest` uses, as recorded by [`Store::keep_uses`]
    /// (`None`: not recorded; GC then walks the version's trees). A store whose trees are
    /// read locally records nothing.
    fn uses(&self, _host: &HostName, _manifest: &Digest) -> Option<BTreeSet<Digest>> {
        None
    }
    /// Records what a format-2 manifest uses, so the next GC need not read its trees back.
    fn keep_uses(&self, _host: &HostName, _manifest: &Digest, _objects: &BTreeSet<Digest>) {}
    /// A reader of `host`'s area for several reads in a row, when the store has a cheaper
    /// one than a lookup per key (the chroot: the host's directory opened once). `None`:
    /// [`HostReader`] reads key by key through the store, which answers the same.
    fn host_reader<'a>(&'a self, _host: &'a HostName) -> Option<Box<dyn HostRead + 'a>> {
        None
    }
    /// [`Store::read_log_received`] of each of `names`, in order (the chroot checks `logs/`
    /// once for all of them: `bento status` reads two files of every host).
    fn read_logs_received(
        &self,
        host: &HostName,
        names: &[&str],
    ) -> Vec<Result<crate::server::logs::Received, LogsError>> {
        names
            .iter()
            .map(|name| self.read_log_received(host, name))
            .collect()
    }
}

/// The bytes of a pooled `cache/` file for [`Store::put_shared`] on a store that cannot
/// hard-link it (anything else is not shared that way).
fn shared_bytes(key: &Key, pooled: &Path) -> Result<Vec<u8>, StoreError> {
    if !matches!(key, Key::Cache(_)) {
        return Err(StoreError::WrongOperation(key.path()));
    }
    std::fs::read(pooled).map_err(|source| StoreError::Io {
        at: pooled.to_owned(),
        source,
    })
}

/// Copies `open`'s bytes to `out`, returning their digest and length: the check every store
/// makes before an object becomes visible.
pub fn copy_hashed(mut from: impl Read, out: &mut impl io::Write) -> io::Result<(Digest, u64)> {
    use sha2::{Digest as _, Sha256};
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
    Ok((Digest::from_bytes(hasher.finalize().into()), total))
}

/// The digests of the objects in `host`'s area, by one listing.
pub fn listed_objects(
    store: &dyn Store,
    host: &HostName,
) -> Result<std::collections::BTreeSet<Digest>, StoreError> {
    Ok(store
        .list(host, Area::Objects)?
        .into_iter()
        .filter_map(|key| match key {
            Key::Object(d) => Some(d),
            _ => None,
        })
        .collect())
}

/// Reads all of `open`'s bytes (at most `limit`, the rest left unread) into memory, checked
/// against `digest`: for a store that sends an object whole.
fn read_verified(
    open: OpenObject<'_>,
    digest: &Digest,
    limit: u64,
    at: PathBuf,
) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::new();
    let (actual, _) = open()
        .and_then(|r| copy_hashed(r.take(limit), &mut bytes))
        .map_err(|source| StoreError::Io { at, source })?;
    if actual != *digest {
        return Err(StoreError::DigestMismatch(*digest));
    }
    Ok(bytes)
}
