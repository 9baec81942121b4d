//! How the chroot spares its file system work a publish need not do. A manifest, signature,
//! stamp or `current` that is pushed out or replaced keeps its inode under a spare name
//! (`atomic::replace_keeping`, or `Store::delete`), and the next one of its kind is written
//! into it (`atomic::write_temp_reusing`), so a publish frees and makes no inode for them;
//! and a publish that ends clean says so, so the next one need not look for its temporary
//! files in every host's directory.

use std::path::{Path, PathBuf};

use super::Key;

/// In `.bento/`: the last holder of the publish lock ended clean (`Store::end_clean`), so
/// no host holds a temporary file of it. Removed, durably, by each lock holder before it
/// writes anything; without it the lock holder sweeps every host first.
pub(super) const CLEAN: &str = "publish-clean";

/// Where a deleted or replaced manifest, signature or stamp (`path`) stays, for the next one
/// of its kind to be written into: every new version writes one of each and pushes the
/// oldest kept one out, and a renewed stamp replaces the one before. One per kind: a second
/// retired file replaces the first. Not a key: whatever lists
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
/// written into it (as [`spare`]). A reader that opened the old `current` reads its bytes
/// until then; after, a newer digest, or, read while it is written, bytes that name no
/// manifest (that run of the agent fails; the next reads anew).
pub(super) fn spare_current(host_dir: &Path) -> PathBuf {
    host_dir.join(".spare.current")
}

#[cfg(test)]
mod tests;
