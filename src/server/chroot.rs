//! The chroot's host directories as sshd and the hosts need them: the path check sshd's
//! ChrootDirectory demands (every component root-owned, unwritable by group and others),
//! who owns what (`Ownership`), and creating, or sealing, one host's directory tree.
//! Both `publish` and `provision` use it; it uses neither.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::protocol::layout::{LOGS, MANIFESTS, OBJECTS};
use crate::protocol::HostName;
use crate::sys::accounts;

#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} exists and is not a directory")]
    NotADirectory(PathBuf),
    #[error("account {0} does not exist: create the host accounts first (`bento server sync-accounts`, or deploy the generated NixOS module)")]
    NoAccount(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ChrootError + '_ {
    move |source| ChrootError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Who owns what in the chroot.
#[derive(Debug, Clone)]
pub enum Ownership {
    /// Running as root: directories get the owners and modes sshd and the host need.
    Root { prefix: String },
    /// Not root (tests, a dry look): modes are set, owners left alone.
    Leave,
}

/// The first component of `path` (from `/` down, as far as it exists) that is not
/// root-owned or is writable by group or others: sshd refuses chroots and, with
/// StrictModes, key files below such a directory.
pub fn unsafe_component(path: &Path) -> io::Result<Option<(PathBuf, String)>> {
    let mut current = PathBuf::new();
    for comp in path.components() {
        current.push(comp);
        let meta = match fs::metadata(&current) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => return Err(e),
        };
        if let Some(problem) = owner_mode_problem(&meta) {
            return Ok(Some((current, problem)));
        }
    }
    Ok(None)
}

/// Why a path with this metadata may not lie on the way to a chroot or key file, if it may not.
pub fn owner_mode_problem(meta: &fs::Metadata) -> Option<String> {
    let mode = meta.mode() & 0o7777;
    if meta.uid() != 0 {
        Some(format!("owned by uid {}, not root", meta.uid()))
    } else if mode & 0o020 != 0 {
        Some(format!("group-writable (mode {mode:04o})"))
    } else if mode & 0o002 != 0 {
        Some(format!("world-writable (mode {mode:04o})"))
    } else {
        None
    }
}

/// Creates `dir` if needed and gives it exactly `mode` and, as root, `uid:gid`.
fn ensure_dir(dir: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<(), ChrootError> {
    // Looked at first: on every publish the directories are there (one call each, where
    // creating first would cost a failed `mkdir` and the look anyway).
    let meta = match fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(dir)(e)),
            }
            fs::symlink_metadata(dir).map_err(io_err(dir))?
        }
        Err(e) => return Err(io_err(dir)(e)),
    };
    if !meta.is_dir() {
        return Err(ChrootError::NotADirectory(dir.to_owned()));
    }
    if let Some((uid, gid)) = owner {
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(io_err(dir))?;
        }
    }
    if meta.permissions().mode() & 0o7777 != mode {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(io_err(dir))?;
    }
    Ok(())
}

/// Creates the host's directory tree (`<host>/`, `manifests/`, `objects/`, `logs/`) with
/// the ownership sshd and the host need. As root, the host's account must exist.
/// `account` looks the account up (`accounts::user`, or a run's `accounts::Directory`).
pub fn prepare_host_dir(
    host_dir: &Path,
    host: &HostName,
    ownership: &Ownership,
    account: impl Fn(&str) -> std::io::Result<Option<accounts::Account>>,
) -> Result<(), ChrootError> {
    match ownership {
        Ownership::Root { prefix } => {
            let account_name = format!("{prefix}{host}");
            let account = account(&account_name)
                .map_err(io_err(Path::new("/etc/passwd")))?
                .ok_or_else(|| ChrootError::NoAccount(account_name.clone()))?;
            // The host directory is the gate: only root and the host's account get in.
            ensure_dir(host_dir, 0o750, Some((0, account.gid)))?;
            ensure_dir(&host_dir.join(MANIFESTS), 0o755, Some((0, 0)))?;
            ensure_dir(&host_dir.join(OBJECTS), 0o755, Some((0, 0)))?;
            ensure_dir(
                &host_dir.join(LOGS),
                0o750,
                Some((account.uid, account.gid)),
            )?;
        }
        Ownership::Leave => {
            for d in [
                host_dir.to_owned(),
                host_dir.join(MANIFESTS),
                host_dir.join(OBJECTS),
                host_dir.join(LOGS),
            ] {
                ensure_dir(&d, 0o755, None)?;
            }
        }
    }
    Ok(())
}

/// Creates the host's private `backups/` area (owned by its account, 0700): a place for
/// restic or borg over the same SFTP login. Root only.
pub fn prepare_backups_dir(
    host_dir: &Path,
    host: &HostName,
    prefix: &str,
) -> Result<(), ChrootError> {
    let account_name = format!("{prefix}{host}");
    let account = accounts::user(&account_name)
        .map_err(io_err(Path::new("/etc/passwd")))?
        .ok_or_else(|| ChrootError::NoAccount(account_name.clone()))?;
    ensure_dir(
        &host_dir.join(crate::protocol::layout::BACKUPS),
        0o700,
        Some((account.uid, account.gid)),
    )
}

/// Whether a host directory is one [`seal_host_dir`] retired (root:root 0700): no host
/// account can enter it, so it is no longer a host of the fleet, only its kept data.
pub fn is_sealed(meta: &fs::Metadata) -> bool {
    meta.is_dir() && meta.uid() == 0 && meta.gid() == 0 && meta.mode() & 0o777 == 0o700
}

/// Hands a host's directory to root alone (root:root 0700), as its account is deleted: the
/// account's uid and gid are free for reuse from then on. Returns what was done, or `None`
/// when there is no directory (a symlink is left alone and not followed).
pub fn seal_host_dir(dir: &Path) -> Result<Option<String>, ChrootError> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(dir)(e)),
    };
    if !meta.is_dir() {
        return Ok(None);
    }
    // The mode first: between the two calls the directory is never open to the old group.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    std::os::unix::fs::lchown(dir, Some(0), Some(0)).map_err(io_err(dir))?;
    Ok(Some(format!(
        "{} kept, now root-only (delete it when no longer needed)",
        dir.display()
    )))
}
