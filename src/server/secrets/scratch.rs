//! The private directory a decrypted secret is edited in (`bento secret edit`): on tmpfs
//! when there is one, mode 0700 from its creation, named after the process that made it so
//! that a later run can tell a directory left by a killed bento from one in use, and remove
//! it. Invariant: no plaintext outlives the run that decrypted it by more than the next run.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::SecretsError;

const PREFIX: &str = "bento-secret-";
/// A directory without a pid in its name is taken for stale after this long.
const UNNAMED_STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// tmpfs when there is one, so the plaintext never reaches a disk.
fn base() -> std::path::PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// A fresh private directory (0700, removed on drop), after removing the stale ones.
pub fn private_dir() -> Result<tempfile::TempDir, SecretsError> {
    let base = base();
    remove_stale(&base);
    tempfile::Builder::new()
        .prefix(&format!("{PREFIX}{}-", std::process::id()))
        .permissions(fs::Permissions::from_mode(0o700))
        .tempdir_in(&base)
        .map_err(|source| SecretsError::Io { path: base, source })
}

/// The pid in a name this module made (`bento-secret-<pid>-<random>`).
fn pid_of(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes this user's `bento-secret-*` directories whose process is gone (killed with the
/// plaintext still there, e.g. by SIGKILL, or left by a bento older than the pid in the
/// name, after a day). Others' directories, and those of a live process, are left alone.
fn remove_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    let me = crate::sys::accounts::euid();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(PREFIX) {
            continue;
        }
        let Ok(meta) = fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != me {
            continue;
        }
        let in_use = match pid_of(name) {
            Some(pid) => Path::new(&format!("/proc/{pid}")).exists(),
            // No pid in the name (made by an older bento): in use only if recent.
            None => meta
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < UNNAMED_STALE_AFTER),
        };
        if in_use {
            continue;
        }
        match fs::remove_dir_all(entry.path()) {
            Ok(()) => tracing::warn!(
                "removed {}, left with a decrypted secret by a bento that did not finish",
                entry.path().display()
            ),
            Err(e) => tracing::warn!("cannot remove {}: {e}", entry.path().display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_is_private_and_stale_ones_go() {
        let base = tempfile::tempdir().unwrap();
        // A dead process's directory (pid 0 is never a process), a live one's (ours), and
        // one of another name.
        let stale = base.path().join(format!("{PREFIX}0-abc"));
        let live = base
            .path()
            .join(format!("{PREFIX}{}-abc", std::process::id()));
        let other = base.path().join("bento-other");
        for d in [&stale, &live, &other] {
            fs::create_dir(d).unwrap();
            fs::write(d.join("secret"), "plain").unwrap();
        }
        remove_stale(base.path());
        assert!(!stale.exists());
        assert!(live.exists() && other.exists());
        assert_eq!(pid_of("bento-secret-123-xyz"), Some(123));
        assert_eq!(pid_of("bento-secret-xyz"), None);

        let dir = private_dir().unwrap();
        let mode = fs::metadata(dir.path()).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        let name = dir.path().file_name().unwrap().to_str().unwrap().to_owned();
        assert_eq!(pid_of(&name), Some(std::process::id()));
    }
}
