//! The chroot's pool (`.bento/pool`): every object once, named by its digest, copied from
//! its source and checked against the digest before it has that name; hosts hard-link it.
//! In a batch (`Store::join_batch`) a copy gets its pool name only when the batch is
//! committed, and hosts sharing it wait for the first one's copy.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use super::{copy_hashed, OpenObject, StoreError};
use crate::protocol::layout::Chroot;
use crate::protocol::manifest::Digest;
use crate::sys::atomic;
use crate::sys::batch::Batch;

/// A batch joined, and the objects queued for the pool in it: hosts sharing a new object
/// wait for the first one's copy (so it is written once, and its link into the pool is
/// queued before any host's link to it).
#[derive(Debug, Clone)]
pub(super) struct Batched {
    pub(super) batch: Arc<Batch>,
    pub(super) pooled: Arc<Mutex<HashMap<Digest, Arc<OnceLock<bool>>>>>,
}

/// Copies `open`'s bytes into the pool as `digest`, checking they still hash to it.
/// In a batch the copy only gets its pool name when the batch is committed.
pub(super) fn add(
    chroot: &Chroot,
    batched: Option<&Batched>,
    digest: &Digest,
    open: OpenObject<'_>,
) -> Result<u64, StoreError> {
    let pooled = chroot.pool_dir().join(digest.to_hex());
    let Some(batched) = batched else {
        if pooled.exists() {
            return Ok(0);
        }
        let (tmp, bytes) = copy_to_tmp(chroot, digest, open, true)?;
        // link, not rename: it never replaces an object another thread already pooled
        // (whose inode hosts may already link to).
        let linked = fs::hard_link(&tmp, &pooled);
        let _ = fs::remove_file(&tmp);
        return match linked {
            Ok(()) => Ok(bytes),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(0),
            Err(source) => Err(StoreError::Io { at: pooled, source }),
        };
    };
    let cell = batched
        .pooled
        .lock()
        .expect("pool lock")
        .entry(*digest)
        .or_default()
        .clone();
    let mut mine = None;
    // Whether the object is there for every host after the first: pooled by an earlier run
    // (looked up once per run, not once per host), or its link into the pool queued.
    let queued = *cell.get_or_init(|| {
        if pooled.exists() {
            return true;
        }
        let copied = copy_to_tmp(chroot, digest, open, false);
        if let Ok((tmp, _)) = &copied {
            batched.batch.link(tmp.clone(), pooled.clone(), true);
        }
        let queued = copied.is_ok();
        mine = Some(copied.map(|(_, bytes)| bytes));
        queued
    });
    match (mine, queued) {
        (Some(copied), _) => copied,
        (None, true) => Ok(0),
        // The first copy failed (its source changed): this host's own copy decides.
        (None, false) => {
            let (tmp, bytes) = copy_to_tmp(chroot, digest, open, false)?;
            batched.batch.link(tmp, pooled, true);
            Ok(bytes)
        }
    }
}

/// Copies `open`'s bytes to a new temporary file (fsynced when `sync`), checked against
/// `digest`; returns it and the bytes copied.
fn copy_to_tmp(
    chroot: &Chroot,
    digest: &Digest,
    open: OpenObject<'_>,
    sync: bool,
) -> Result<(PathBuf, u64), StoreError> {
    // Threads publishing hosts that share a file may add it at the same time: each
    // writes its own temporary file, and the first to link it into the pool wins.
    let tmp = atomic::tmp_path(&chroot.tmp_dir().join(digest.to_hex()));
    let copy = || -> io::Result<(Digest, u64)> {
        let src = open()?;
        let mut dst = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        dst.set_permissions(fs::Permissions::from_mode(0o644))?;
        let hashed = copy_hashed(src, &mut dst)?;
        if sync {
            dst.sync_all()?;
        }
        Ok(hashed)
    };
    let (actual, bytes) = copy().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        StoreError::Io {
            at: tmp.clone(),
            source: e,
        }
    })?;
    if actual != *digest {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::DigestMismatch(*digest));
    }
    Ok((tmp, bytes))
}
