//! Publishing one host: objects first, then the manifest, then `current` swapped by
//! rename. Whatever moment a publish dies at, `current` names a complete version (the old
//! one or the new one). Old versions beyond the last three are collected afterwards.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{HostPlan, HostReport, Ownership, PublishError, Status};
use crate::protocol::layout::{self, Chroot, MANIFESTS, OBJECTS};
use crate::protocol::manifest::{Digest, Manifest};
use crate::server::chroot::prepare_host_dir;
use crate::sys::atomic;

/// How many versions (manifests and their objects) a host keeps, the live one included.
pub const KEEP_VERSIONS: usize = 3;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PublishError + '_ {
    move |source| PublishError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads the live manifest, if any. A missing or broken one counts as none: the next
/// publish replaces it.
pub fn read_current(host_dir: &Path) -> Option<(Digest, Manifest)> {
    let text = fs::read_to_string(layout::current(host_dir)).ok()?;
    let digest = layout::parse_current(&text).ok()?;
    let bytes = fs::read(layout::manifest(host_dir, &digest)).ok()?;
    if Digest::of(&bytes) != digest {
        return None;
    }
    Some((digest, Manifest::parse(&bytes).ok()?))
}

/// Copies `source` into the pool as `digest`, checking the bytes still hash to it.
fn add_to_pool(
    chroot: &Chroot,
    digest: &Digest,
    source: &crate::server::hostfiles::Source,
) -> Result<u64, PublishError> {
    let pooled = chroot.pool_dir().join(digest.to_hex());
    if pooled.exists() {
        return Ok(0);
    }
    // Threads publishing hosts that share a file may add it at the same time: each writes
    // its own temporary file, and the first to link it into the pool wins.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = chroot.tmp_dir().join(format!(
        "{}{}-{seq}-{}",
        atomic::TMP_PREFIX,
        std::process::id(),
        digest.to_hex()
    ));
    let copy = || -> io::Result<(Digest, u64)> {
        let mut src: Box<dyn Read> = match source {
            // The path the scanner resolved, opened without following any link: a directory
            // swapped for a symlink since the scan fails here instead of reaching outside.
            crate::server::hostfiles::Source::File(path) => {
                Box::new(crate::server::snapshot::repo::open_resolved_file(path)?)
            }
            crate::server::hostfiles::Source::Bytes(bytes) => {
                Box::new(io::Cursor::new(bytes.clone()))
            }
        };
        let mut dst = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        dst.set_permissions(fs::Permissions::from_mode(0o644))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut n_total = 0u64;
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            dst.write_all(&buf[..n])?;
            n_total += n as u64;
        }
        dst.sync_all()?;
        Ok((Digest::from_bytes(hasher.finalize().into()), n_total))
    };
    let (actual, bytes) = copy().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(&source.describe())(e)
    })?;
    if actual != *digest {
        let _ = fs::remove_file(&tmp);
        return Err(PublishError::ChangedWhilePublishing(source.describe()));
    }
    // link, not rename: it never replaces an object another thread already pooled (whose
    // inode hosts may already link to).
    let linked = fs::hard_link(&tmp, &pooled);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(bytes),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(0),
        Err(e) => Err(io_err(&pooled)(e)),
    }
}

/// Makes `objects/<digest>` in the host directory: a hard link to the pooled copy.
fn link_object(chroot: &Chroot, host_dir: &Path, digest: &Digest) -> Result<(), PublishError> {
    let target = layout::object(host_dir, digest);
    let pooled = chroot.pool_dir().join(digest.to_hex());
    match fs::hard_link(&pooled, &target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(&target)(e)),
    }
}

/// Publishes one host. Returns what happened; errors leave the previous version live.
pub fn publish_host(
    chroot: &Chroot,
    plan: &HostPlan,
    ownership: &Ownership,
    signer: Option<&crate::protocol::signing::Signer>,
) -> Result<HostReport, PublishError> {
    let host_dir = chroot.host_dir(&plan.host);
    let live = read_current(&host_dir);
    // The new version's serial: one more than the live one's, so hosts order versions
    // without trusting clocks (a manifest from before serials counts as 0).
    let mut numbered = plan.manifest.clone();
    numbered.serial = live
        .as_ref()
        .map_or_else(|| newest_kept_serial(&host_dir), |(_, m)| m.serial)
        .saturating_add(1);
    let manifest = &numbered;
    let objects = manifest.objects();
    let mut warnings = Vec::new();
    if let Some((digest, live)) = &live {
        if live.created.system_time() > manifest.created.system_time() {
            warnings.push(format!(
                "{}: this machine's clock ({}) is behind the live version {} ({}); hosts order versions by serial, so serial {} is still newer for them, but check the clock",
                plan.host,
                manifest.created,
                digest.short(),
                live.created,
                manifest.serial
            ));
        }
    }
    let report = |status, digest, new_objects, bytes| HostReport {
        host: plan.host.clone(),
        status,
        digest: Some(digest),
        config_entries: manifest.config.len(),
        files: manifest.files.len(),
        objects: objects.len(),
        new_objects,
        bytes,
        error: None,
        warnings: Vec::new(),
    };

    if let Some((digest, live)) = &live {
        if live.same_content(manifest) {
            // A key configured since the last publish: sign the live manifest in place.
            if let Some(signer) = signer {
                let sig_path = layout::signature(&host_dir, digest);
                if !sig_path.exists() {
                    let bytes =
                        fs::read(layout::manifest(&host_dir, digest)).map_err(io_err(&host_dir))?;
                    atomic::write_file(&sig_path, signer.sign(&bytes)?.as_bytes(), 0o644)
                        .map_err(io_err(&sig_path))?;
                }
            }
            return Ok(report(Status::Unchanged, *digest, 0, 0));
        }
    }

    prepare_host_dir(&host_dir, &plan.host, ownership)?;
    atomic::remove_stale_temps(&host_dir).map_err(io_err(&host_dir))?;
    atomic::remove_stale_temps(&host_dir.join(MANIFESTS)).map_err(io_err(&host_dir))?;

    let mut new_objects = 0;
    let mut bytes = 0;
    for digest in &objects {
        if layout::object(&host_dir, digest).exists() {
            continue;
        }
        let source = plan
            .sources
            .get(digest)
            .ok_or_else(|| PublishError::Internal(format!("no source for object {digest}")))?;
        bytes += add_to_pool(chroot, digest, source)?;
        link_object(chroot, &host_dir, digest)?;
        new_objects += 1;
    }
    if new_objects > 0 {
        atomic::sync_dir(&chroot.pool_dir()).map_err(io_err(&chroot.pool_dir()))?;
        let dir = host_dir.join(OBJECTS);
        atomic::sync_dir(&dir).map_err(io_err(&dir))?;
    }

    let manifest_bytes = manifest.to_bytes();
    let digest = Digest::of(&manifest_bytes);
    let manifest_path = layout::manifest(&host_dir, &digest);
    atomic::write_file(&manifest_path, &manifest_bytes, 0o644).map_err(io_err(&manifest_path))?;
    // The signature lands before `current` names the manifest: a host never sees an
    // unsigned live version from a signing fleet.
    if let Some(signer) = signer {
        let sig_path = layout::signature(&host_dir, &digest);
        atomic::write_file(&sig_path, signer.sign(&manifest_bytes)?.as_bytes(), 0o644)
            .map_err(io_err(&sig_path))?;
    }
    let current = layout::current(&host_dir);
    atomic::write_file(&current, layout::current_text(&digest).as_bytes(), 0o644)
        .map_err(io_err(&current))?;
    bytes += manifest_bytes.len() as u64;

    collect_host(&host_dir, &digest).map_err(io_err(&host_dir))?;
    Ok(HostReport {
        warnings,
        ..report(Status::Published, digest, new_objects, bytes)
    })
}

/// The highest serial among the host's kept manifests, for a host whose `current` is
/// missing or broken: numbering must not start again below what hosts have applied.
fn newest_kept_serial(host_dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(host_dir.join(MANIFESTS)) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| fs::read(e.path()).ok())
        .filter_map(|b| Manifest::parse(&b).ok())
        .map(|m| m.serial)
        .max()
        .unwrap_or(0)
}

/// Keeps the live version and the newest others up to `KEEP_VERSIONS` in all; removes
/// other manifests and every object none of the kept manifests uses.
pub fn collect_host(host_dir: &Path, live: &Digest) -> io::Result<()> {
    let mdir = host_dir.join(MANIFESTS);
    // (order, digest, file, manifest) of every version but the live one.
    type Other = (
        Option<(u64, std::time::SystemTime)>,
        Digest,
        PathBuf,
        Option<Manifest>,
    );
    let mut others: Vec<Other> = Vec::new();
    let mut kept: Vec<Manifest> = Vec::new();
    for entry in fs::read_dir(&mdir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(digest) = name
            .strip_suffix(".json")
            .and_then(|d| d.parse::<Digest>().ok())
        else {
            continue;
        };
        let parsed = fs::read(entry.path())
            .ok()
            .and_then(|b| Manifest::parse(&b).ok());
        match parsed {
            Some(m) if digest == *live => kept.push(m),
            Some(m) => others.push((Some(m.order()), digest, entry.path(), Some(m))),
            // Unreadable manifests are not a version anyone can use.
            None => others.push((None, digest, entry.path(), None)),
        }
    }
    // Newest first: by serial, then (manifests from before serials) compared as times
    // (publish has written whole seconds and milliseconds); ties broken by digest so the
    // choice is stable. A manifest stamped in the future is not kept forever.
    others.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    for (i, (_, _, path, parsed)) in others.into_iter().enumerate() {
        match parsed {
            Some(m) if i + 1 < KEEP_VERSIONS => kept.push(m),
            _ => fs::remove_file(&path)?,
        }
    }
    for entry in fs::read_dir(&mdir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".sig") {
            if !mdir.join(format!("{stem}.json")).exists() {
                fs::remove_file(entry.path())?;
            }
        }
    }
    let used: BTreeSet<String> = kept
        .iter()
        .flat_map(|m| m.objects())
        .map(|d| d.to_hex())
        .collect();
    let odir = host_dir.join(OBJECTS);
    for entry in fs::read_dir(&odir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !used.contains(&name) {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Removes pooled objects that no host links to any more (link count 1: only the pool).
pub fn collect_pool(chroot: &Chroot) -> io::Result<usize> {
    let mut removed = 0;
    let pool = chroot.pool_dir();
    let entries = match fs::read_dir(&pool) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.metadata()?.nlink() <= 1 {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}
