//! Crash-safe file updates: write a temporary file beside the target, fsync it, rename it
//! over the target, fsync the directory. A reader sees the old bytes or the new ones, never
//! a mix, and after a crash the rename is either durable or did not happen.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Temporary files start with this; a later run may delete any it finds.
pub const TMP_PREFIX: &str = ".tmp-";

/// A temporary name beside `target`, unique in this process and across processes.
pub fn tmp_path(target: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = N.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!("{TMP_PREFIX}{}-{n}-{name}", std::process::id()))
}

/// fsync a directory, making renames and new entries in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to a new temporary file beside `target` with `mode`, fsynced; returns its
/// path. The caller renames it into place (or removes it).
pub fn write_temp(target: &Path, bytes: &[u8], mode: u32) -> io::Result<PathBuf> {
    write_temp_as(tmp_path(target), bytes, mode, true)
}

/// [`write_temp`] without the fsync, for a batch of files (`sys::batch`) that syncs the
/// whole filesystem once before it renames anything into place.
pub fn write_temp_unsynced(target: &Path, bytes: &[u8], mode: u32) -> io::Result<PathBuf> {
    write_temp_as(tmp_path(target), bytes, mode, false)
}

/// [`write_temp_unsynced`] into a retired file's inode: `spare` (a name the caller gave a
/// file instead of deleting it) is renamed to the temporary name and overwritten. Without a
/// spare, a new file. A file system without a journal skips every recently freed inode when
/// it makes a new one (ext4 rereads each: the publisher's creates grew with its deletes), so
/// a file replaced on every publish costs no inode freed and none made.
pub fn write_temp_reusing(
    target: &Path,
    spare: &Path,
    bytes: &[u8],
    mode: u32,
) -> io::Result<PathBuf> {
    write_reusing(
        tmp_path(target),
        spare,
        bytes,
        mode,
        Made::New { sync: false },
    )
}

/// Puts `new` in place as `target`, atomically, keeping the file it replaces as `spare`
/// instead of freeing it: the two names are exchanged (`renameat2` with `RENAME_EXCHANGE`),
/// then the old file is renamed to `spare`. A reader that opened the old file reads its bytes
/// until the next writer reuses the spare. Where the file system cannot exchange names, or
/// there is no `target` yet, a plain rename.
pub fn replace_keeping(new: &Path, target: &Path, spare: &Path) -> io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, new, CWD, target, RenameFlags::EXCHANGE) {
        Ok(()) => {
            if fs::rename(new, spare).is_err() {
                let _ = fs::remove_file(new);
            }
            Ok(())
        }
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            fs::rename(new, target)
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes `bytes` as the file `path`, unsynced, replacing what a killed run left there: for
/// files that are temporary by name (a later step renames them once durable).
pub fn write_new_unsynced(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_as(path.to_owned(), bytes, mode, Made::Replacing).map(drop)
}

/// [`write_new_unsynced`] into the inode of `spare`, as [`write_temp_reusing`].
pub fn write_new_reusing(path: &Path, spare: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_reusing(path.to_owned(), spare, bytes, mode, Made::Replacing).map(drop)
}

/// Writes `path` through the inode of `spare` if there is one, else made as `otherwise`.
fn write_reusing(
    path: PathBuf,
    spare: &Path,
    bytes: &[u8],
    mode: u32,
    otherwise: Made,
) -> io::Result<PathBuf> {
    match fs::rename(spare, &path) {
        // A spare that is not one plain file is dropped (its name removed), not written
        // through.
        Ok(()) => match write_as(path.clone(), bytes, mode, Made::Reused) {
            Ok(path) => Ok(path),
            Err(_) => write_as(path, bytes, mode, otherwise),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => write_as(path, bytes, mode, otherwise),
        Err(e) => Err(e),
    }
}

/// How [`write_as`] makes its file.
enum Made {
    /// A new name, fsynced or not.
    New { sync: bool },
    /// A temporary name a killed run may have left: truncated, unsynced.
    Replacing,
    /// A retired file renamed to a temporary name: overwritten (its blocks kept when the new
    /// bytes fill them), unsynced; refused unless it is a plain file no other name shares
    /// (its bytes would not be only the retired file's).
    Reused,
}

fn write_temp_as(tmp: PathBuf, bytes: &[u8], mode: u32, sync: bool) -> io::Result<PathBuf> {
    write_as(tmp, bytes, mode, Made::New { sync })
}

fn write_as(path: PathBuf, bytes: &[u8], mode: u32, made: Made) -> io::Result<PathBuf> {
    let result = (|| {
        use std::os::unix::fs::MetadataExt;
        let mut open = OpenOptions::new();
        open.write(true).mode(mode);
        match made {
            Made::New { .. } => open.create_new(true),
            Made::Replacing => open.create(true).truncate(true),
            Made::Reused => open.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK),
        };
        let mut f = open.open(&path)?;
        let reused = match made {
            Made::Reused => {
                let meta = f.metadata()?;
                if !meta.is_file() || meta.nlink() != 1 {
                    return Err(io::Error::other("not one file alone"));
                }
                Some(meta)
            }
            _ => None,
        };
        // The mode given to open is filtered by the umask; set it exactly.
        if reused.as_ref().is_none_or(|m| m.mode() & 0o7777 != mode) {
            f.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        f.write_all(bytes)?;
        if reused.is_some_and(|m| m.len() > bytes.len() as u64) {
            f.set_len(bytes.len() as u64)?;
        }
        match made {
            Made::New { sync: true } => f.sync_all(),
            _ => Ok(()),
        }
    })();
    match result {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Replaces `target` with `bytes` atomically and durably.
pub fn write_file(target: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    rename_into(write_temp(target, bytes, mode)?, target)?;
    sync_dir(target.parent().unwrap_or(Path::new(".")))
}

/// Replaces `target` with `bytes` atomically, not durably: for a cache a crash may cost, whose
/// reader refuses bytes no writer wrote (a crash can leave the new name on unwritten blocks).
pub fn replace_unsynced(target: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    rename_into(write_temp_unsynced(target, bytes, mode)?, target)
}

/// Renames the temporary `tmp` to `target`, removing it if that fails.
fn rename_into(tmp: PathBuf, target: &Path) -> io::Result<()> {
    fs::rename(&tmp, target).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Removes temporary files left in `dir` by an interrupted run.
pub fn remove_stale_temps(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            fs::remove_file(entry.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// An exclusive lock on a file, held until dropped.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl Lock {
    fn open(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
    }

    /// Takes the lock, waiting for another holder; `on_wait` is called once if it must wait.
    pub fn acquire(path: &Path, on_wait: impl FnOnce()) -> io::Result<Lock> {
        let file = Self::open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                on_wait();
                file.lock()?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        Ok(Lock { _file: file })
    }

    /// Takes the lock or returns `None` if someone holds it.
    pub fn try_acquire(path: &Path) -> io::Result<Option<Lock>> {
        let file = Self::open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Lock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replaces_and_sets_mode() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("current");
        write_file(&p, b"one", 0o644).unwrap();
        write_file(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1, "no temp left");
    }

    #[test]
    fn a_spare_lends_its_inode_only_when_no_other_name_shares_it() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let (target, spare) = (t.path().join("m.json"), t.path().join(".spare.json"));
        fs::write(&spare, b"a longer retired manifest").unwrap();
        let ino = fs::metadata(&spare).unwrap().ino();
        let tmp = write_temp_reusing(&target, &spare, b"new", 0o644).unwrap();
        assert_eq!(fs::metadata(&tmp).unwrap().ino(), ino, "the spare's inode");
        assert_eq!(
            fs::read(&tmp).unwrap(),
            b"new",
            "no bytes of the spare left"
        );
        assert_eq!(fs::metadata(&tmp).unwrap().mode() & 0o777, 0o644);
        assert!(!spare.exists(), "a spare lends its inode once");
        // No spare: a new file.
        let again = write_temp_reusing(&target, &spare, b"next", 0o644).unwrap();
        assert_ne!(fs::metadata(&again).unwrap().ino(), ino);
        assert_eq!(fs::read(&again).unwrap(), b"next");

        // A spare another name shares is not written through: that name keeps its bytes.
        let other = t.path().join("other");
        fs::write(&other, b"someone else's").unwrap();
        fs::hard_link(&other, &spare).unwrap();
        let tmp = write_temp_reusing(&target, &spare, b"mine", 0o644).unwrap();
        assert_eq!(fs::read(&tmp).unwrap(), b"mine");
        assert_eq!(fs::read(&other).unwrap(), b"someone else's");
        assert_eq!(
            fs::metadata(&other).unwrap().nlink(),
            1,
            "the spare's name dropped"
        );
        // Nor a link to elsewhere.
        std::os::unix::fs::symlink(&other, &spare).unwrap();
        let tmp = write_temp_reusing(&target, &spare, b"mine", 0o644).unwrap();
        assert_eq!(fs::read(&tmp).unwrap(), b"mine");
        assert!(!fs::symlink_metadata(&tmp).unwrap().is_symlink());
        assert_eq!(fs::read(&other).unwrap(), b"someone else's");
    }

    #[test]
    fn stale_temps_are_removed() {
        let t = tempfile::tempdir().unwrap();
        let tmp = write_temp(&t.path().join("x"), b"partial", 0o644).unwrap();
        assert!(tmp.exists());
        assert_eq!(remove_stale_temps(t.path()).unwrap(), 1);
        assert!(!tmp.exists());
    }

    #[test]
    fn lock_is_exclusive() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("lock");
        let held = Lock::try_acquire(&p).unwrap();
        assert!(held.is_some());
        assert!(Lock::try_acquire(&p).unwrap().is_none());
        drop(held);
        assert!(Lock::try_acquire(&p).unwrap().is_some());
    }
}
