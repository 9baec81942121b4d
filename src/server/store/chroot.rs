//! [`ChrootStore`]: the store as sshd serves it, a directory per host under one root. Keeps
//! today's guarantees: objects pooled once in `.bento/pool` and hard-linked into each host's
//! `objects/`, every other write a temporary file, fsync and rename (in a publish's batch:
//! one sync of the filesystem before all the renames, and `current` renamed from a file
//! made durable with its version), owners and modes as `server::chroot` sets them,
//! host-written files read by `server::logs` (no links, bounded), and the publish lock in
//! `.bento/`.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::hostdir::{read_bounded, read_prefix};
use super::pool::{self, Batched};
use super::reuse::{spare, spare_current, CLEAN};
use super::{
    Area, Capabilities, Cas, HostRead, Key, LogEntry, LogsError, OpenObject, Store, StoreError,
    StoreLock, Version,
};
use crate::protocol::layout::{self, Chroot, CACHE, MANIFESTS, OBJECTS};
use crate::protocol::manifest::Digest;
use crate::protocol::HostName;
use crate::server::chroot::{prepare_host_dir, unsafe_component, Ownership};
use crate::server::logs;
use crate::sys::accounts::Directory;
use crate::sys::atomic;
use crate::sys::batch::Batch;

/// A chroot root and who owns what in it.
#[derive(Debug, Clone)]
pub struct ChrootStore {
    chroot: Chroot,
    ownership: Ownership,
    /// The batch this run's writes wait for (`Store::join_batch`), if any.
    batch: Arc<Mutex<Option<Batched>>>,
    /// The chroot's root, opened the first time a host's area is read through it
    /// ([`Store::host_reader`]); `None` when it could not be (read by path then).
    root: std::sync::Arc<std::sync::OnceLock<Option<std::os::fd::OwnedFd>>>,
    /// The `current`s this run prepared whose switch has not come (yet).
    prepared: Arc<Mutex<std::collections::BTreeSet<PathBuf>>>,
    /// The hosts' accounts, read once a run (as root).
    accounts: Arc<std::sync::OnceLock<Directory>>,
}

/// The name under which a version's `current` waits, durable, for its switch (a temporary
/// name: a later publish of the host removes one left behind).
fn prepared_current(host_dir: &Path, digest: &Digest) -> PathBuf {
    host_dir.join(format!("{}current-{}", atomic::TMP_PREFIX, digest.to_hex()))
}

pub(super) fn io_at(at: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        at: at.to_owned(),
        source,
    }
}

impl ChrootStore {
    pub fn new(chroot: Chroot, ownership: Ownership) -> Self {
        Self {
            chroot,
            ownership,
            batch: Arc::default(),
            root: Default::default(),
            prepared: Arc::default(),
            accounts: Arc::default(),
        }
    }

    fn batched(&self) -> Option<Batched> {
        self.batch.lock().expect("batch lock").clone()
    }

    /// The chroot, for what is not the hosts' areas (the publisher's caches, accounts).
    pub fn chroot(&self) -> &Chroot {
        &self.chroot
    }

    fn path(&self, host: &HostName, key: &Key) -> PathBuf {
        self.chroot.host_dir(host).join(key.path())
    }

    /// Removes the temporary files every host's directory and `manifests/` hold: what a
    /// lock holder that did not end clean may have left (a publish killed, a host staged
    /// but never switched).
    fn sweep_hosts(&self) -> Result<(), StoreError> {
        use rayon::prelude::*;
        self.hosts()?.par_iter().try_for_each(|host| {
            let dir = self.chroot.host_dir(host);
            for d in [dir.join(MANIFESTS), dir] {
                match atomic::remove_stale_temps(&d) {
                    // A directory this publisher cannot list (a retired host's, sealed by
                    // root) holds nothing it wrote.
                    Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
                    done => {
                        done.map_err(io_at(&d))?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Copies `open`'s bytes into the pool as `digest` (see [`pool::add`]).
    fn add_to_pool(&self, digest: &Digest, open: OpenObject<'_>) -> Result<u64, StoreError> {
        pool::add(&self.chroot, self.batched().as_ref(), digest, open)
    }

    /// Creates the chroot root and its state directory, checked as sshd will check it.
    fn prepare_root(&self) -> Result<(), StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        let chroot = &self.chroot;
        if matches!(self.ownership, Ownership::Root { .. }) {
            match unsafe_component(&chroot.root) {
                Ok(None) => {}
                Ok(Some((path, problem))) => {
                    return Err(StoreError::UnsafeChrootPath { path, problem })
                }
                Err(source) => return Err(io_at(&chroot.root)(source)),
            }
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&chroot.root)
            .map_err(io_at(&chroot.root))?;
        for dir in [chroot.state_dir(), chroot.pool_dir(), chroot.tmp_dir()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_at(&dir))?;
        }
        fs::set_permissions(chroot.state_dir(), fs::Permissions::from_mode(0o700))
            .map_err(io_at(&chroot.state_dir()))
    }
}

/// A directory of a host's `cache/`: readable by the host (through its 0750 host
/// directory), writable by root only, as the pool-linked objects.
fn ensure_cache_dir(dir: &Path) -> Result<(), StoreError> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_at(dir)(e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(io_at(dir))?;
    if !meta.is_dir() {
        return Err(io_at(dir)(io::Error::other(
            "exists and is not a directory",
        )));
    }
    if crate::sys::accounts::is_root() && (meta.uid() != 0 || meta.gid() != 0) {
        std::os::unix::fs::chown(dir, Some(0), Some(0)).map_err(io_at(dir))?;
    }
    if meta.permissions().mode() & 0o7777 != 0o755 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_at(dir))?;
    }
    Ok(())
}

/// Hard-links `from` (the publisher's pool) to `to`, replacing a different file there by a
/// rename, so a host never reads half a file; `Ok(false)` when it is that file already.
fn link_shared(from: &Path, to: &Path) -> Result<bool, StoreError> {
    let src = fs::metadata(from).map_err(io_at(from))?;
    if src.permissions().mode() & 0o777 != 0o644 {
        fs::set_permissions(from, fs::Permissions::from_mode(0o644)).map_err(io_at(from))?;
    }
    match fs::symlink_metadata(to) {
        Ok(m) if m.ino() == src.ino() && m.dev() == src.dev() => return Ok(false),
        Ok(_) => {
            let tmp = to.with_file_name(format!(
                "{}{}-{}",
                atomic::TMP_PREFIX,
                std::process::id(),
                to.file_name().unwrap_or_default().to_string_lossy()
            ));
            let _ = fs::remove_file(&tmp);
            fs::hard_link(from, &tmp).map_err(io_at(&tmp))?;
            fs::rename(&tmp, to).map_err(io_at(to))?;
        }
        Err(_) => fs::hard_link(from, to).map_err(io_at(to))?,
    }
    Ok(true)
}

/// The names in `dir`, none when it does not exist.
fn names(dir: &Path) -> Result<Vec<String>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_at(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        out.push(
            entry
                .map_err(io_at(dir))?
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    Ok(out)
}

/// The files under `dir`, recursively, as paths relative to it (links not followed).
fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<(), StoreError> {
    for name in names(dir)? {
        let path = dir.join(&name);
        let rel = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let meta = fs::symlink_metadata(&path).map_err(io_at(&path))?;
        if meta.is_dir() {
            walk(&path, &rel, out)?;
        } else {
            out.push(rel);
        }
    }
    Ok(())
}

impl Store for ChrootStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_replace: true,
            // Checked and renamed under the publish lock, which every writer takes.
            compare_and_swap: Cas::Honoured,
            server_side_copy: true,
        }
    }

    fn locate(&self, host: &HostName, key: &Key) -> PathBuf {
        self.path(host, key)
    }

    fn lock(&self, on_wait: Box<dyn FnOnce() + '_>) -> Result<StoreLock, StoreError> {
        self.prepare_root()?;
        let path = self.chroot.lock_path();
        let lock = atomic::Lock::acquire(&path, on_wait).map_err(io_at(&path))?;
        let tmp = self.chroot.tmp_dir();
        atomic::remove_stale_temps(&tmp).map_err(io_at(&tmp))?;
        let state = self.chroot.state_dir();
        let clean = state.join(CLEAN);
        match fs::remove_file(&clean) {
            // Gone for good before this holder leaves any temporary file: a crash from
            // here on makes the next holder sweep.
            Ok(()) => atomic::sync_dir(&state).map_err(io_at(&state))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.sweep_hosts()?,
            Err(e) => return Err(io_at(&clean)(e)),
        }
        Ok(StoreLock::new(lock))
    }

    fn hosts(&self) -> Result<Vec<HostName>, StoreError> {
        let mut hosts: Vec<HostName> = names(&self.chroot.root)?
            .into_iter()
            .filter_map(|n| HostName::new(&n).ok())
            .filter(|h| self.chroot.host_dir(h).is_dir())
            .collect();
        hosts.sort();
        Ok(hosts)
    }

    fn open_host(&self, host: &HostName) -> Result<(), StoreError> {
        let dir = self.chroot.host_dir(host);
        let accounts = || self.accounts.get_or_init(Directory::load);
        prepare_host_dir(&dir, host, &self.ownership, |n| accounts().user(n))?;
        Ok(())
    }

    fn get(&self, host: &HostName, key: &Key, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if let Key::Log(_) = key {
            return Err(StoreError::WrongOperation(key.path()));
        }
        read_bounded(&self.path(host, key), limit)
    }

    fn get_prefix(
        &self,
        host: &HostName,
        key: &Key,
        len: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        if let Key::Log(_) = key {
            return Err(StoreError::WrongOperation(key.path()));
        }
        let path = self.path(host, key);
        match fs::File::open(&path) {
            Ok(f) => read_prefix(f, &path, len).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    fn exists(&self, host: &HostName, key: &Key) -> Result<bool, StoreError> {
        let path = self.path(host, key);
        match fs::symlink_metadata(&path) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    fn list(&self, host: &HostName, area: Area) -> Result<Vec<Key>, StoreError> {
        let dir = self.chroot.host_dir(host);
        let mut keys: Vec<Key> = match area {
            Area::Manifests | Area::Objects => {
                let sub = if area == Area::Manifests {
                    MANIFESTS
                } else {
                    OBJECTS
                };
                names(&dir.join(sub))?
                    .into_iter()
                    .filter_map(|n| Key::parse(&format!("{sub}/{n}")))
                    .collect()
            }
            Area::Cache => {
                let mut rels = Vec::new();
                walk(&dir.join(CACHE), "", &mut rels)?;
                rels.into_iter()
                    .filter_map(|r| Key::parse(&format!("{CACHE}/{r}")))
                    .collect()
            }
        };
        keys.sort();
        Ok(keys)
    }

    fn put(&self, host: &HostName, key: &Key, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.path(host, key);
        match key {
            Key::Manifest(_) | Key::Signature(_) | Key::Fresh(_) => {}
            Key::Cache(_) => {
                // cache/ is root's and read-only to the host, as the pool-linked objects.
                if let Some(parent) = path.parent() {
                    use std::os::unix::fs::DirBuilderExt;
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o755)
                        .create(parent)
                        .map_err(io_at(parent))?;
                }
            }
            _ => return Err(StoreError::WrongOperation(key.path())),
        }
        let Some(batched) = self.batched() else {
            return atomic::write_file(&path, bytes, 0o644).map_err(io_at(&path));
        };
        match spare(&path, key) {
            Some(spare) => batched.batch.write_reusing(&path, &spare, bytes, 0o644),
            None => batched.batch.write(&path, bytes, 0o644),
        }
        .map_err(io_at(&path))?;
        if let Key::Manifest(digest) = key {
            // `current`'s bytes for this version, made durable by the batch's commit with
            // the manifest, renamed by the switch. Its name is already a temporary one.
            let prepared = prepared_current(&self.chroot.host_dir(host), digest);
            let text = layout::current_text(digest);
            let spare = spare_current(&self.chroot.host_dir(host));
            batched
                .batch
                .write_kept_reusing(&prepared, &spare, text.as_bytes(), 0o644)
                .map_err(io_at(&prepared))?;
            self.prepared.lock().expect("prepared").insert(prepared);
        }
        Ok(())
    }

    fn put_object(
        &self,
        host: &HostName,
        digest: &Digest,
        open: OpenObject<'_>,
    ) -> Result<Option<u64>, StoreError> {
        let dir = self.chroot.host_dir(host);
        let target = layout::object(&dir, digest);
        let batched = self.batched();
        // A batch's publish asks only for what `held_objects` did not list, and its commit
        // leaves a name that is there alone: no lookup per object.
        if batched.is_none() && target.exists() {
            return Ok(None);
        }
        let bytes = self.add_to_pool(digest, open)?;
        let pooled = self.chroot.pool_dir().join(digest.to_hex());
        if let Some(batched) = batched {
            batched.batch.link(pooled, target, false);
            return Ok(Some(bytes));
        }
        match fs::hard_link(pooled, &target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_at(&target)(e)),
        }
        // Made durable once per host, by `switch_current`, before `current` names them.
        Ok(Some(bytes))
    }

    fn join_batch(&self, batch: Arc<Batch>) -> bool {
        *self.batch.lock().expect("batch lock") = Some(Batched {
            batch,
            pooled: Arc::default(),
        });
        true
    }

    fn held_objects(
        &self,
        host: &HostName,
    ) -> Result<Option<std::collections::BTreeSet<Digest>>, StoreError> {
        super::listed_objects(self, host).map(Some)
    }

    fn put_shared(&self, host: &HostName, key: &Key, pooled: &Path) -> Result<bool, StoreError> {
        let Key::Cache(sub) = key else {
            return Err(StoreError::WrongOperation(key.path()));
        };
        let host_dir = self.chroot.host_dir(host);
        let mut dir = host_dir.join(CACHE);
        ensure_cache_dir(&dir)?;
        let parts: Vec<&str> = sub.as_str().split('/').collect();
        for part in &parts[..parts.len() - 1] {
            dir.push(part);
            ensure_cache_dir(&dir)?;
        }
        link_shared(pooled, &self.path(host, key))
    }

    fn delete(&self, host: &HostName, key: &Key) -> Result<(), StoreError> {
        if key.host_written() {
            return Err(StoreError::WrongOperation(key.path()));
        }
        let path = self.path(host, key);
        let gone = match spare(&path, key) {
            Some(spare) => fs::rename(&path, spare),
            None => fs::remove_file(&path),
        };
        match gone {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    fn current(&self, host: &HostName) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
        // A `current` is one line; anything longer is broken and counts by its prefix (the
        // publisher's own file: the next publish replaces it).
        let path = self.path(host, &Key::Current);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_at(&path)(e)),
        };
        let bytes = read_prefix(file, &path, 4096)?;
        Ok(Some(bytes).map(|bytes| {
            let version = Version(String::from_utf8_lossy(&bytes).into_owned());
            (bytes, version)
        }))
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
        let path = self.path(host, &Key::Current);
        if let Some(batched) = self.batched() {
            // What the version needs must have its name first (a publish commits before
            // its switches, so this finds nothing waiting).
            if !batched.batch.is_empty() {
                batched.batch.commit().map_err(|e| io_at(&e.at)(e.source))?;
            }
            // Kept by a committed batch, this file is durable (its temporary name says it
            // may not be, until then); the run's last commit makes the rename durable.
            // Absent (a version written before the batch was joined): written below.
            let dir = self.chroot.host_dir(host);
            let prepared = prepared_current(&dir, to);
            match atomic::replace_keeping(&prepared, &path, &spare_current(&dir)) {
                Ok(()) => {
                    self.prepared.lock().expect("prepared").remove(&prepared);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&path)(e)),
            }
        }
        // The objects linked since the last switch become durable before `current` names them.
        for dir in [
            self.chroot.pool_dir(),
            self.chroot.host_dir(host).join(OBJECTS),
        ] {
            atomic::sync_dir(&dir).map_err(io_at(&dir))?;
        }
        // And the `cache/` files linked for a server-built system.
        let cache = self.chroot.host_dir(host).join(CACHE);
        for dir in [cache.join("nar"), cache] {
            if dir.is_dir() {
                atomic::sync_dir(&dir).map_err(io_at(&dir))?;
            }
        }
        atomic::write_file(&path, layout::current_text(to).as_bytes(), 0o644).map_err(io_at(&path))
    }

    /// Removes pooled objects that no host links to any more (link count 1: only the pool).
    fn collect_shared(&self) -> Result<usize, StoreError> {
        use rayon::prelude::*;
        let pool = self.chroot.pool_dir();
        // A fleet's pool holds thousands of objects: looked at on every core.
        names(&pool)?
            .into_par_iter()
            .map(|name| {
                let path = pool.join(name);
                let meta = fs::symlink_metadata(&path).map_err(io_at(&path))?;
                if meta.nlink() > 1 {
                    return Ok(0);
                }
                fs::remove_file(&path).map_err(io_at(&path))?;
                Ok(1)
            })
            .sum()
    }

    fn end_clean(&self) -> Result<(), StoreError> {
        // A version staged but never switched (its host failed, or raced) leaves its
        // prepared `current`: this run's own, removed here rather than by a sweep.
        let left = std::mem::take(&mut *self.prepared.lock().expect("prepared"));
        for path in left {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_at(&path)(e)),
                _ => {}
            }
        }
        // Not synced: lost in a crash, it costs the next run a sweep, nothing more.
        let clean = self.chroot.state_dir().join(CLEAN);
        fs::File::create(&clean).map_err(io_at(&clean))?;
        Ok(())
    }

    fn list_logs(&self, host: &HostName, dir: Option<&str>) -> Result<Vec<LogEntry>, LogsError> {
        let host_dir = self.chroot.host_dir(host);
        match dir {
            None => logs::list(&host_dir),
            Some(sub) => logs::list_in(&host_dir, sub),
        }
    }

    fn read_log(
        &self,
        host: &HostName,
        dir: Option<&str>,
        name: &str,
    ) -> Result<Vec<u8>, LogsError> {
        let host_dir = self.chroot.host_dir(host);
        match dir {
            None => logs::read(&host_dir, name),
            Some(sub) => logs::read_in(&host_dir, sub, name),
        }
    }

    /// The modification time of the file read (from the open file, not a second lookup).
    fn read_log_received(&self, host: &HostName, name: &str) -> Result<logs::Received, LogsError> {
        let mut read = self.read_logs_received(host, &[name]);
        read.pop().expect("one result per name")
    }

    fn read_logs_received(
        &self,
        host: &HostName,
        names: &[&str],
    ) -> Vec<Result<logs::Received, LogsError>> {
        logs::read_each(&self.chroot.host_dir(host), names)
    }

    /// Every key read relative to the chroot's root, opened once for the store's life:
    /// each file is one short lookup (`<host>/<key>`), not the root's whole path again.
    fn host_reader<'a>(&'a self, host: &'a HostName) -> Option<Box<dyn HostRead + 'a>> {
        let root = self
            .root
            .get_or_init(|| super::hostdir::open_root(&self.chroot.root))
            .as_ref()?;
        Some(Box::new(super::hostdir::HostDir::new(
            root,
            host,
            self.chroot.host_dir(host),
        )))
    }
}
