//! Putting a fetched version in place: the configuration tree staged in the state directory
//! and swapped in by renaming a symlink, and the `files` entries installed at their targets
//! (temporary file beside the target, owner and mode set, fsync, rename), with files that an
//! earlier version installed and this one dropped removed.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::protocol::manifest::{ConfigEntry, Digest, FileEntry, Manifest};
use crate::sys::accounts;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("file {target}: no user {name:?} on this machine")]
    NoUser { target: String, name: String },
    #[error("file {target}: no group {name:?} on this machine")]
    NoGroup { target: String, name: String },
    #[error("file {target}: {dir} is not owned by root; refusing to write through it")]
    UnsafeParent { target: String, dir: PathBuf },
    #[error(transparent)]
    Secret(#[from] crate::agent::secrets::SecretError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Builds `config/<digest>/` from the object cache (if not there already) and points
/// `config/current` at it. The previous tree stays until the next version replaces it.
pub fn stage_config(
    manifest: &Manifest,
    digest: &Digest,
    objects: &Path,
    config_root: &Path,
) -> Result<PathBuf, InstallError> {
    let dest = config_root.join(digest.to_hex());
    if !dest.is_dir() {
        let staging = config_root.join(format!(".staging-{digest}"));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
        }
        fs::create_dir(&staging).map_err(io_err(&staging))?;
        for entry in &manifest.config {
            // Paths were checked by Manifest::parse_untrusted: relative, no `..`, parents first.
            let path = staging.join(entry.path().as_str());
            match entry {
                ConfigEntry::Directory { .. } => fs::create_dir(&path).map_err(io_err(&path))?,
                ConfigEntry::File {
                    sha256, executable, ..
                } => {
                    let src = objects.join(sha256.to_hex());
                    fs::copy(&src, &path).map_err(io_err(&src))?;
                    let mode = if *executable { 0o755 } else { 0o644 };
                    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                        .map_err(io_err(&path))?;
                }
            }
        }
        fs::rename(&staging, &dest).map_err(io_err(&dest))?;
    }
    // Swap the `current` link atomically: a new link, renamed over the old one.
    let link = config_root.join("current");
    let tmp = config_root.join(".current-tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(digest.to_hex(), &tmp).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &link).map_err(io_err(&link))?;
    crate::sys::atomic::sync_dir(config_root).map_err(io_err(config_root))?;
    Ok(dest)
}

/// Removes staged trees other than `keep`.
pub fn prune_configs(config_root: &Path, keep: &[Digest]) -> io::Result<()> {
    let keep: BTreeSet<String> = keep.iter().map(Digest::to_hex).collect();
    for entry in fs::read_dir(config_root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.len() == 64 && !keep.contains(&name) {
            fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

/// `target` under `root` (`/` normally; `/mnt` when installing onto a mounted system).
pub fn under_root(root: &Path, target: &str) -> PathBuf {
    root.join(target.trim_start_matches('/'))
}

fn resolve_owner(f: &FileEntry) -> Result<(u32, u32), InstallError> {
    let target = f.target.to_string();
    let uid = match f.owner.parse::<u32>() {
        Ok(n) => n,
        Err(_) => {
            accounts::user(&f.owner)
                .map_err(io_err(Path::new("/etc/passwd")))?
                .ok_or_else(|| InstallError::NoUser {
                    target: target.clone(),
                    name: f.owner.clone(),
                })?
                .uid
        }
    };
    let gid = match f.group.parse::<u32>() {
        Ok(n) => n,
        Err(_) => accounts::group(&f.group)
            .map_err(io_err(Path::new("/etc/group")))?
            .ok_or_else(|| InstallError::NoGroup {
                target,
                name: f.group.clone(),
            })?,
    };
    Ok((uid, gid))
}

/// Creates missing parents (0755) and refuses existing ones owned by anyone but root (or
/// the agent's own user): a directory another user controls could redirect the write.
fn prepare_parent(root: &Path, path: &Path, target: &str) -> Result<(), InstallError> {
    let parent = path.parent().unwrap_or(root);
    let mut dir = PathBuf::new();
    for comp in parent.components() {
        dir.push(comp);
        if matches!(comp, Component::RootDir) {
            continue;
        }
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.uid() == 0 || m.uid() == crate::sys::accounts::euid() => {}
            Ok(_) => {
                return Err(InstallError::UnsafeParent {
                    target: target.to_owned(),
                    dir,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                use std::os::unix::fs::DirBuilderExt;
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&dir)
                    .map_err(io_err(&dir))?;
            }
            Err(e) => return Err(io_err(&dir)(e)),
        }
    }
    Ok(())
}

/// Installs every entry of `files` and removes targets in `previous` that are gone.
/// Owners are resolved and encrypted entries decrypted with `identity` before anything is
/// written. Returns the installed targets.
pub fn install_files(
    files: &[FileEntry],
    objects: &Path,
    root: &Path,
    previous: &[String],
    identity: &Path,
) -> Result<Vec<String>, InstallError> {
    let owners: Vec<(u32, u32)> = files.iter().map(resolve_owner).collect::<Result<_, _>>()?;
    // Secrets: every encrypted entry is decrypted here, before the first write.
    let plain = crate::agent::secrets::open(files, objects, identity)?;
    for ((f, (uid, gid)), plain) in files.iter().zip(owners).zip(plain) {
        let target = f.target.to_string();
        let path = under_root(root, &target);
        prepare_parent(root, &path, &target)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.bento-tmp"));
        let _ = fs::remove_file(&tmp);
        let src = objects.join(f.sha256.to_hex());
        let bytes = match plain {
            Some(plain) => plain,
            None => fs::read(&src).map_err(io_err(&src))?,
        };
        let write = || -> io::Result<()> {
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            std::os::unix::fs::fchown(&out, Some(uid), Some(gid))?;
            out.set_permissions(fs::Permissions::from_mode(f.mode.0))?;
            out.write_all(&bytes)?;
            out.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&path)(e));
        }
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        if let Some(parent) = path.parent() {
            crate::sys::atomic::sync_dir(parent).map_err(io_err(parent))?;
        }
    }
    let now: BTreeSet<&str> = files.iter().map(|f| f.target.as_str()).collect();
    for old in previous {
        if now.contains(old.as_str()) {
            continue;
        }
        let path = under_root(root, old);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => fs::remove_file(&path).map_err(io_err(&path))?,
            _ => {}
        }
    }
    Ok(files.iter().map(|f| f.target.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::manifest::{Build, Mode, RelPath, TargetPath, FORMAT};
    use crate::protocol::HostName;

    fn entry(target: &str, content: &[u8], mode: u32) -> FileEntry {
        FileEntry {
            path: RelPath::new(target.trim_start_matches('/')).unwrap(),
            target: TargetPath::new(target).unwrap(),
            size: content.len() as u64,
            sha256: Digest::of(content),
            // Owned by whoever runs the test (root on a machine, `nobody` in CI's non-root
            // unit tier): chown to oneself needs no privilege.
            owner: crate::sys::accounts::euid().to_string(),
            group: crate::sys::accounts::egid().to_string(),
            mode: Mode(mode),
            encrypted: None,
        }
    }

    #[test]
    fn files_are_installed_and_dropped_ones_removed() {
        let t = tempfile::tempdir().unwrap();
        let objects = t.path().join("objects");
        let root = t.path().join("root");
        fs::create_dir_all(&objects).unwrap();
        fs::create_dir_all(&root).unwrap();
        for c in [b"one".as_slice(), b"two"] {
            fs::write(objects.join(Digest::of(c).to_hex()), c).unwrap();
        }
        let first = vec![
            entry("/etc/a", b"one", 0o640),
            entry("/etc/deep/b", b"two", 0o600),
        ];
        let installed =
            install_files(&first, &objects, &root, &[], Path::new("/nonexistent")).unwrap();
        assert_eq!(fs::read(root.join("etc/a")).unwrap(), b"one");
        assert_eq!(
            fs::metadata(root.join("etc/a")).unwrap().mode() & 0o7777,
            0o640
        );
        assert_eq!(fs::read(root.join("etc/deep/b")).unwrap(), b"two");

        let second = vec![entry("/etc/a", b"two", 0o600)];
        install_files(
            &second,
            &objects,
            &root,
            &installed,
            Path::new("/nonexistent"),
        )
        .unwrap();
        assert_eq!(fs::read(root.join("etc/a")).unwrap(), b"two");
        assert!(!root.join("etc/deep/b").exists(), "dropped file removed");
    }

    #[test]
    fn unknown_owner_writes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let mut e = entry("/etc/a", b"one", 0o600);
        e.owner = "no-such-user-bento".into();
        let err =
            install_files(&[e], t.path(), t.path(), &[], Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("no-such-user-bento"), "{err}");
        assert!(!t.path().join("etc").exists());
    }

    #[test]
    fn config_is_staged_and_swapped() {
        let t = tempfile::tempdir().unwrap();
        let objects = t.path().join("objects");
        let config = t.path().join("config");
        fs::create_dir_all(&objects).unwrap();
        fs::create_dir_all(&config).unwrap();
        fs::write(objects.join(Digest::of(b"x").to_hex()), b"x").unwrap();
        let m = Manifest {
            format: FORMAT,
            host: HostName::new("a").unwrap(),
            created: crate::protocol::Timestamp::from_unix(0),
            source_commit: None,
            dirty: false,
            build: Build::Classic,
            system: None,
            config: vec![
                ConfigEntry::Directory {
                    path: RelPath::new("d").unwrap(),
                },
                ConfigEntry::File {
                    path: RelPath::new("d/run.sh").unwrap(),
                    size: 1,
                    sha256: Digest::of(b"x"),
                    executable: true,
                },
            ],
            files: vec![],
        };
        let digest = m.digest();
        let dir = stage_config(&m, &digest, &objects, &config).unwrap();
        assert_eq!(fs::read(dir.join("d/run.sh")).unwrap(), b"x");
        assert_eq!(
            fs::metadata(dir.join("d/run.sh")).unwrap().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_link(config.join("current")).unwrap(),
            Path::new(&digest.to_hex())
        );
    }
}
