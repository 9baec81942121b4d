//! How the chroot spares its file system work a publish need not do. A new version's
//! manifest, signature, stamp and `current` are written into the inodes of the ones it
//! pushes out (kept under a spare name in between), so a publish frees and makes no inode
//! for them; and a publish that ends clean says so, so the next one need not look for its
//! temporary files in every host's directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::Key;

/// In `.bento/`: the last holder of the publish lock ended clean (`Store::end_clean`), so
/// no host holds a temporary file of it. Removed, durably, by each lock holder before it
/// writes anything; without it the lock holder sweeps every host first.
pub(super) const CLEAN: &str = "publish-clean";

/// Where a deleted manifest, signature or stamp (`path`) stays, for the next one of its kind
/// to be written into (`atomic::write_temp_reusing`): every new version writes one of each
/// and pushes the oldest kept one out, so a publish frees and makes no inode for them. One
/// per kind: a second retired file replaces the first. Not a key: whatever lists
/// `manifests/` for keys skips it.
pub(super) fn spare(path: &Path, key: &Key) -> Option<PathBuf> {
    match key {
        Key::Manifest(_) | Key::Signature(_) | Key::Fresh(_) => {
            let kind = path.extension()?.to_str()?;
            Some(path.with_file_name(format!(".spare.{kind}")))
        }
        _ => None,
    }
}

/// Where the file `current` was stays once replaced: the next version's `current` is
/// written into it (as [`spare`]).
pub(super) fn spare_current(host_dir: &Path) -> PathBuf {
    host_dir.join(".spare.current")
}

/// Puts `prepared` in place as `current`, atomically. The two are exchanged, so the old
/// `current` is kept, as `spare`, not freed. A reader that opened the old `current` reads
/// its bytes until the next publish writes into it; then a newer digest, or, read while it
/// is written, bytes that name no manifest (that run of the agent fails; the next reads
/// anew). Where the file system cannot exchange names (or there is no `current` yet), a
/// rename.
pub(super) fn switch_prepared(prepared: &Path, current: &Path, spare: &Path) -> io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, prepared, CWD, current, RenameFlags::EXCHANGE) {
        Ok(()) => {
            if fs::rename(prepared, spare).is_err() {
                let _ = fs::remove_file(prepared);
            }
            Ok(())
        }
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            fs::rename(prepared, current)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests;
