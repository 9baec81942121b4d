//! Where the OpenSSH control socket lives: under the state directory when its path is short
//! enough, else in a short private directory, so a deep `state_dir` never makes every
//! connection fail with "too long for Unix domain socket".
//!
//! Invariant: the directory returned by [`prepare`] is a real directory (not a link) owned
//! by this user with no access for anyone else, and a socket in it fits `sun_path`.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// The longest Unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// What is added to the control directory: the `openssh` crate's
/// `/.ssh-connectionXXXXXX/master` (29 bytes), and ssh's `.XXXXXXXXXXXXXXXX` on the
/// temporary socket it binds before renaming it (17).
const SOCKET_SUFFIX: usize = 29 + 17;
/// The longest control directory kept where it was asked for.
pub const MAX_CONTROL_DIR: usize = MAX_SOCKET_PATH - SOCKET_SUFFIX;

/// The control directory to use for `preferred` (the state directory's `ssh/`): itself when
/// a socket under it fits, else `/run/bento-ssh-<uid>-<hash>` (root) or `/tmp/…` (others),
/// the hash naming the preferred path so two agents never share one.
pub fn choose(preferred: &Path) -> PathBuf {
    if preferred.as_os_str().len() <= MAX_CONTROL_DIR {
        return preferred.to_owned();
    }
    let uid = crate::sys::accounts::euid();
    let base = if uid == 0 { "/run" } else { "/tmp" };
    let hash = Sha256::digest(preferred.as_os_str().as_encoded_bytes());
    let short: String = hash.iter().take(6).map(|b| format!("{b:02x}")).collect();
    Path::new(base).join(format!("bento-ssh-{uid}-{short}"))
}

/// Chooses the control directory for `preferred` and makes sure it exists, private: a
/// short one in a shared place that is a link, someone else's, or open to others is refused
/// rather than used.
pub fn prepare(preferred: &Path) -> io::Result<PathBuf> {
    let dir = choose(preferred);
    if dir == preferred {
        std::fs::create_dir_all(&dir)?;
        return Ok(dir);
    }
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    let uid = crate::sys::accounts::euid();
    if !meta.file_type().is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "{} (the ssh control directory, short because {} is too long for a socket path) is not a private directory of uid {uid}",
            dir.display(),
            preferred.display()
        )));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_state_dir_keeps_its_socket_and_a_deep_one_gets_a_short_private_dir() {
        let short = Path::new("/var/lib/bento/ssh");
        assert_eq!(choose(short), short);
        let deep = PathBuf::from(format!("/var/lib/{}/ssh", "d".repeat(90)));
        let chosen = choose(&deep);
        assert!(chosen.as_os_str().len() <= MAX_CONTROL_DIR, "{chosen:?}");
        // Stable for one state directory, distinct for another.
        assert_eq!(choose(&deep), chosen);
        let other = PathBuf::from(format!("/var/lib/{}/ssh", "e".repeat(90)));
        assert_ne!(choose(&other), chosen);
        // At the limit exactly, a socket path still fits.
        let edge = PathBuf::from(format!("/{}", "x".repeat(MAX_CONTROL_DIR - 1)));
        assert_eq!(choose(&edge), edge);
        assert!(edge.as_os_str().len() + SOCKET_SUFFIX <= MAX_SOCKET_PATH);
    }
}
