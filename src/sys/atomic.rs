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

/// Writes `bytes` as the file `path`, unsynced, replacing what a killed run left there: for
/// files that are temporary by name (a later step renames them once durable).
pub fn write_new_unsynced(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_as(path.to_owned(), bytes, mode, Made::Replacing).map(drop)
}

/// How [`write_as`] makes its file.
enum Made {
    /// A new name, fsynced or not.
    New { sync: bool },
    /// A temporary name a killed run may have left: truncated, unsynced.
    Replacing,
}

fn write_temp_as(tmp: PathBuf, bytes: &[u8], mode: u32, sync: bool) -> io::Result<PathBuf> {
    write_as(tmp, bytes, mode, Made::New { sync })
}

fn write_as(path: PathBuf, bytes: &[u8], mode: u32, made: Made) -> io::Result<PathBuf> {
    let result = (|| {
        let mut open = OpenOptions::new();
        open.write(true).mode(mode);
        match made {
            Made::New { .. } => open.create_new(true),
            Made::Replacing => open.create(true).truncate(true),
        };
        let mut f = open.open(&path)?;
        // The mode given to open is filtered by the umask; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
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
