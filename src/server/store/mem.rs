//! [`MemStore`], the store in memory, so publish, rollback and GC logic is tested without a
//! disk, root or sshd; and [`Faulty`], a wrapper that fails every mutating request after
//! the k-th, to test what a publish killed at any moment leaves behind. Both keep the
//! trait's invariant: a request either happens whole or not at all.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{
    read_verified, Area, Capabilities, Cas, Key, LogEntry, LogsError, OpenObject, Store,
    StoreError, StoreLock, SubPath, Version,
};
use crate::protocol::layout;
use crate::protocol::manifest::Digest;
use crate::protocol::HostName;

/// Every host's keys and bytes, and a generation per `current` as its version.
#[derive(Debug, Default)]
pub struct MemStore {
    hosts: Mutex<BTreeMap<HostName, BTreeMap<Key, Vec<u8>>>>,
    /// The version of each host's `current`, as an object store's ETag changes per write.
    versions: Mutex<BTreeMap<HostName, Version>>,
    generation: AtomicUsize,
    /// The version of `current` each host's heartbeat last confirmed (`Store::confirm`).
    confirmations: Mutex<BTreeMap<HostName, Version>>,
    /// `Some`: `current` as last read or switched through this store, offered as
    /// `Store::remembered_current` (an object store's index); see [`MemStore::remembering`].
    remembered: Option<Mutex<BTreeMap<HostName, Current>>>,
}

/// `current`'s bytes and version.
type Current = (Vec<u8>, Version);

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that remembers `current` as an object store's index does, so a publish of a
    /// new version need not read it first.
    pub fn remembering() -> Self {
        Self {
            remembered: Some(Mutex::default()),
            ..Self::default()
        }
    }

    /// Switches `current` as another publisher would: behind this store's memory of it.
    pub fn switch_elsewhere(&self, host: &HostName, to: &Digest) {
        let next = self.version();
        self.with(host, |m| {
            m.insert(Key::Current, layout::current_text(to).into_bytes())
        });
        self.versions
            .lock()
            .expect("not poisoned")
            .insert(host.clone(), next);
    }

    fn remember(&self, host: &HostName, now: &Option<Current>) {
        if let Some(memory) = &self.remembered {
            let mut memory = memory.lock().expect("not poisoned");
            match now {
                Some(now) => memory.insert(host.clone(), now.clone()),
                None => memory.remove(host),
            };
        }
    }

    /// Every key of `host`, in order (for tests that check what a run left).
    pub fn keys(&self, host: &HostName) -> Vec<Key> {
        let hosts = self.hosts.lock().expect("not poisoned");
        hosts
            .get(host)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Writes what a host writes into its `logs/` (tests of status and history).
    pub fn put_log(&self, host: &HostName, path: &str, bytes: &[u8]) {
        let key = Key::Log(SubPath::new(path).expect("a plain path"));
        self.with(host, |m| m.insert(key, bytes.to_vec()));
    }

    fn with<T>(&self, host: &HostName, f: impl FnOnce(&mut BTreeMap<Key, Vec<u8>>) -> T) -> T {
        let mut hosts = self.hosts.lock().expect("not poisoned");
        f(hosts.entry(host.clone()).or_default())
    }

    fn read(&self, host: &HostName, key: &Key) -> Option<Vec<u8>> {
        let hosts = self.hosts.lock().expect("not poisoned");
        hosts.get(host).and_then(|m| m.get(key)).cloned()
    }

    fn version(&self) -> Version {
        Version(format!(
            "g{}",
            self.generation.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn logs_under(&self, host: &HostName, dir: Option<&str>) -> Vec<(String, Vec<u8>)> {
        let prefix = dir.map_or_else(String::new, |d| format!("{d}/"));
        self.keys(host)
            .into_iter()
            .filter_map(|k| match &k {
                Key::Log(p) => {
                    let rest = p.as_str().strip_prefix(&prefix)?;
                    (!rest.contains('/')).then(|| (rest.to_owned(), self.read(host, &k)))
                }
                _ => None,
            })
            .filter_map(|(n, b)| Some((n, b?)))
            .collect()
    }
}

impl Store for MemStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_replace: true,
            compare_and_swap: Cas::Honoured,
            server_side_copy: false,
        }
    }

    fn locate(&self, host: &HostName, key: &Key) -> PathBuf {
        PathBuf::from(format!("mem:{host}/{}", key.path()))
    }

    fn lock(&self, _on_wait: Box<dyn FnOnce() + '_>) -> Result<StoreLock, StoreError> {
        // One process's tests: the lock guards nothing another process could touch.
        Ok(StoreLock::new(()))
    }

    fn hosts(&self) -> Result<Vec<HostName>, StoreError> {
        Ok(self
            .hosts
            .lock()
            .expect("not poisoned")
            .keys()
            .cloned()
            .collect())
    }

    fn open_host(&self, host: &HostName) -> Result<(), StoreError> {
        self.with(host, |_| ());
        Ok(())
    }

    fn get(&self, host: &HostName, key: &Key, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match self.read(host, key) {
            Some(b) if b.len() as u64 > limit => Err(StoreError::TooLarge {
                at: self.locate(host, key),
                max: limit,
            }),
            other => Ok(other),
        }
    }

    fn get_prefix(
        &self,
        host: &HostName,
        key: &Key,
        len: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read(host, key).map(|mut b| {
            b.truncate(usize::try_from(len).unwrap_or(usize::MAX));
            b
        }))
    }

    fn exists(&self, host: &HostName, key: &Key) -> Result<bool, StoreError> {
        Ok(self.read(host, key).is_some())
    }

    fn list(&self, host: &HostName, area: Area) -> Result<Vec<Key>, StoreError> {
        Ok(self
            .keys(host)
            .into_iter()
            .filter(|k| k.path().starts_with(area.prefix()))
            .collect())
    }

    fn put(&self, host: &HostName, key: &Key, bytes: &[u8]) -> Result<(), StoreError> {
        match key {
            Key::Manifest(_) | Key::Signature(_) | Key::Fresh(_) | Key::Cache(_) => {
                self.with(host, |m| m.insert(key.clone(), bytes.to_vec()));
                Ok(())
            }
            _ => Err(StoreError::WrongOperation(key.path())),
        }
    }

    fn put_object(
        &self,
        host: &HostName,
        digest: &Digest,
        open: OpenObject<'_>,
    ) -> Result<Option<u64>, StoreError> {
        let key = Key::Object(*digest);
        if self.read(host, &key).is_some() {
            return Ok(None);
        }
        let bytes = read_verified(open, digest, u64::MAX, self.locate(host, &key))?;
        let n = bytes.len() as u64;
        self.with(host, |m| m.insert(key, bytes));
        Ok(Some(n))
    }

    fn put_shared(&self, host: &HostName, key: &Key, pooled: &Path) -> Result<bool, StoreError> {
        let bytes = super::shared_bytes(key, pooled)?;
        if self.read(host, key).as_ref() == Some(&bytes) {
            return Ok(false);
        }
        self.with(host, |m| m.insert(key.clone(), bytes));
        Ok(true)
    }

    fn delete(&self, host: &HostName, key: &Key) -> Result<(), StoreError> {
        if key.host_written() || *key == Key::Current {
            return Err(StoreError::WrongOperation(key.path()));
        }
        self.with(host, |m| m.remove(key));
        Ok(())
    }

    fn current(&self, host: &HostName) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
        let version = self
            .versions
            .lock()
            .expect("not poisoned")
            .get(host)
            .cloned();
        let now = self
            .read(host, &Key::Current)
            .map(|b| (b, version.unwrap_or_else(|| Version(String::new()))));
        self.remember(host, &now);
        Ok(now)
    }

    fn remembered_current(&self, host: &HostName) -> Option<(Vec<u8>, Version)> {
        let memory = self.remembered.as_ref()?.lock().expect("not poisoned");
        memory.get(host).cloned()
    }

    fn switch_current(
        &self,
        host: &HostName,
        to: &Digest,
        from: Option<&Version>,
    ) -> Result<(), StoreError> {
        let now = self.current(host)?.map(|(_, v)| v);
        if now.as_ref() != from {
            return Err(StoreError::Raced { host: host.clone() });
        }
        self.switch_elsewhere(host, to);
        // Remembered as an object store learns the new ETag: from the switch's answer.
        self.current(host).map(|_| ())
    }

    fn collect_shared(&self) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// Every version is a new generation, so a confirmation stands exactly while `current`
    /// stays as it was (no expiry: the tests' clock is not the publisher's).
    fn confirmed(&self, host: &HostName, version: &Version) -> bool {
        self.confirmations.lock().expect("not poisoned").get(host) == Some(version)
    }

    fn confirm(&self, host: &HostName, version: &Version) {
        self.confirmations
            .lock()
            .expect("not poisoned")
            .insert(host.clone(), version.clone());
    }

    fn list_logs(&self, host: &HostName, dir: Option<&str>) -> Result<Vec<LogEntry>, LogsError> {
        Ok(self
            .logs_under(host, dir)
            .into_iter()
            .map(|(name, bytes)| LogEntry {
                name,
                size: bytes.len() as u64,
                refused: None,
                modified: None,
            })
            .collect())
    }

    fn read_log(
        &self,
        host: &HostName,
        dir: Option<&str>,
        name: &str,
    ) -> Result<Vec<u8>, LogsError> {
        let path = dir.map_or_else(|| name.to_owned(), |d| format!("{d}/{name}"));
        let missing = || LogsError::Io {
            path: PathBuf::from(format!("mem:{host}/logs/{path}")),
            source: io::ErrorKind::NotFound.into(),
        };
        let key = Key::Log(SubPath::new(&path).ok_or_else(missing)?);
        self.read(host, &key).ok_or_else(missing)
    }
}

/// A store whose mutating requests fail, every one, after the first `allowed`: a publish
/// killed after its k-th request, seen from the store. Reads pass through.
pub struct Faulty<'a> {
    inner: &'a dyn Store,
    allowed: usize,
    made: AtomicUsize,
    /// Manifests read through it.
    manifests_read: AtomicUsize,
}

impl<'a> Faulty<'a> {
    pub fn new(inner: &'a dyn Store, allowed: usize) -> Self {
        Self {
            inner,
            allowed,
            made: AtomicUsize::new(0),
            manifests_read: AtomicUsize::new(0),
        }
    }

    /// How many manifests were read through it.
    pub fn manifests_read(&self) -> usize {
        self.manifests_read.load(Ordering::SeqCst)
    }

    /// How many mutating requests were asked for, failed ones included.
    pub fn requests(&self) -> usize {
        self.made.load(Ordering::SeqCst)
    }

    fn admit(&self, host: &HostName, key: &Key) -> Result<(), StoreError> {
        if self.made.fetch_add(1, Ordering::SeqCst) < self.allowed {
            Ok(())
        } else {
            Err(StoreError::Io {
                at: self.inner.locate(host, key),
                source: io::Error::other("injected fault: the publisher was killed"),
            })
        }
    }
}

impl Store for Faulty<'_> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn locate(&self, host: &HostName, key: &Key) -> PathBuf {
        self.inner.locate(host, key)
    }
    fn lock(&self, on_wait: Box<dyn FnOnce() + '_>) -> Result<StoreLock, StoreError> {
        self.inner.lock(on_wait)
    }
    fn hosts(&self) -> Result<Vec<HostName>, StoreError> {
        self.inner.hosts()
    }
    fn open_host(&self, host: &HostName) -> Result<(), StoreError> {
        self.admit(host, &Key::Current)?;
        self.inner.open_host(host)
    }
    fn get(&self, host: &HostName, key: &Key, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if let Key::Manifest(_) = key {
            self.manifests_read.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.get(host, key, limit)
    }
    fn get_prefix(
        &self,
        host: &HostName,
        key: &Key,
        len: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_prefix(host, key, len)
    }
    fn exists(&self, host: &HostName, key: &Key) -> Result<bool, StoreError> {
        self.inner.exists(host, key)
    }
    fn list(&self, host: &HostName, area: Area) -> Result<Vec<Key>, StoreError> {
        self.inner.list(host, area)
    }
    fn put(&self, host: &HostName, key: &Key, bytes: &[u8]) -> Result<(), StoreError> {
        self.admit(host, key)?;
        self.inner.put(host, key, bytes)
    }
    fn put_object(
        &self,
        host: &HostName,
        digest: &Digest,
        open: OpenObject<'_>,
    ) -> Result<Option<u64>, StoreError> {
        self.admit(host, &Key::Object(*digest))?;
        self.inner.put_object(host, digest, open)
    }
    fn put_shared(&self, host: &HostName, key: &Key, pooled: &Path) -> Result<bool, StoreError> {
        self.admit(host, key)?;
        self.inner.put_shared(host, key, pooled)
    }
    fn delete(&self, host: &HostName, key: &Key) -> Result<(), StoreError> {
        self.admit(host, key)?;
        self.inner.delete(host, key)
    }
    fn current(&self, host: &HostName) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
        self.inner.current(host)
    }
    fn switch_current(
        &self,
        host: &HostName,
        to: &Digest,
        from: Option<&Version>,
    ) -> Result<(), StoreError> {
        self.admit(host, &Key::Current)?;
        self.inner.switch_current(host, to, from)
    }
    fn collect_shared(&self) -> Result<usize, StoreError> {
        if self.made.fetch_add(1, Ordering::SeqCst) >= self.allowed {
            return Err(StoreError::Io {
                at: PathBuf::from("shared"),
                source: io::Error::other("injected fault: the publisher was killed"),
            });
        }
        self.inner.collect_shared()
    }

    fn end_clean(&self) -> Result<(), StoreError> {
        self.inner.end_clean()
    }
    fn list_logs(&self, host: &HostName, dir: Option<&str>) -> Result<Vec<LogEntry>, LogsError> {
        self.inner.list_logs(host, dir)
    }
    fn read_log(
        &self,
        host: &HostName,
        dir: Option<&str>,
        name: &str,
    ) -> Result<Vec<u8>, LogsError> {
        self.inner.read_log(host, dir, name)
    }
}
