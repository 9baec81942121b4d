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
    #[error("file {target}: {dir}{via} is not owned by root; refusing to write through it")]
    UnsafeParent {
        target: String,
        dir: PathBuf,
        via: String,
    },
    #[error("file {target}: {link} leads to {leads}, outside the files root {root}; refusing to write there")]
    OutsideRoot {
        target: String,
        link: PathBuf,
        leads: PathBuf,
        root: PathBuf,
    },
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

/// The directory a target's file really goes into: `path`'s parent with every symlink
/// resolved. Missing directories are created (0755) when `create`. Refused, naming the
/// path: a parent that leads outside `root` (a root-owned link to another user's home is
/// as good as a write there), and one whose real path has a directory owned by anyone but
/// root (or the agent's own user), which could redirect the write. The check is on where
/// the path really leads, so it holds for links at any depth; what it checks is root's own
/// (only root can change a root-owned directory afterwards).
fn real_parent(
    root: &Path,
    path: &Path,
    target: &str,
    create: bool,
) -> Result<PathBuf, InstallError> {
    let real_root = fs::canonicalize(root).map_err(io_err(root))?;
    let parent = path.parent().unwrap_or(root);
    let rel = parent.strip_prefix(root).unwrap_or(Path::new(""));
    check_owners(&real_root, target, None)?;
    let mut lexical = root.to_path_buf();
    let mut real = real_root.clone();
    for comp in rel.components() {
        let Component::Normal(name) = comp else {
            continue;
        };
        lexical.push(name);
        let next = real.join(name);
        match fs::symlink_metadata(&next) {
            Ok(_) => {
                let resolved = fs::canonicalize(&next).map_err(io_err(&lexical))?;
                if !resolved.starts_with(&real_root) {
                    return Err(InstallError::OutsideRoot {
                        target: target.to_owned(),
                        link: lexical,
                        leads: resolved,
                        root: real_root,
                    });
                }
                if !fs::metadata(&resolved).map_err(io_err(&lexical))?.is_dir() {
                    return Err(io_err(&lexical)(io::Error::other("not a directory")));
                }
                let via = (resolved != next).then(|| lexical.clone());
                check_owners(&resolved, target, via.as_deref())?;
                real = resolved;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                use std::os::unix::fs::DirBuilderExt;
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&next)
                    .map_err(io_err(&next))?;
                real = next;
            }
            Err(e) => return Err(io_err(&lexical)(e)),
        }
    }
    Ok(real)
}

/// Refuses `dir` (a resolved path) when it or a directory above it is owned by anyone but
/// root or the agent's own user. `via` is the link the target's path went through, for the
/// message.
fn check_owners(dir: &Path, target: &str, via: Option<&Path>) -> Result<(), InstallError> {
    let mut at = PathBuf::new();
    for comp in dir.components() {
        at.push(comp);
        let m = fs::symlink_metadata(&at).map_err(io_err(&at))?;
        if m.uid() != 0 && m.uid() != crate::sys::accounts::euid() {
            return Err(InstallError::UnsafeParent {
                target: target.to_owned(),
                dir: at,
                via: via.map_or_else(String::new, |v| format!(" (where {} leads)", v.display())),
            });
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
        let lexical = under_root(root, &target);
        let name = lexical.file_name().unwrap_or_default().to_owned();
        // Written where the parent really is, checked there (issue #14 item 6).
        let path = real_parent(root, &lexical, &target, true)?.join(&name);
        let name = name.to_string_lossy().into_owned();
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
        let lexical = under_root(root, old);
        // Removed only where a write would be allowed: never through a link out of `root`.
        let path = match real_parent(root, &lexical, old, false) {
            Ok(dir) => dir.join(lexical.file_name().unwrap_or_default()),
            Err(InstallError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue
            }
            Err(e) => {
                tracing::warn!("not removing {old}: {e}");
                continue;
            }
        };
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

    /// Issue #14 item 6: a parent directory that is a link is judged by where it leads.
    #[test]
    fn a_linked_parent_is_checked_where_it_leads() {
        let t = tempfile::tempdir().unwrap();
        let objects = t.path().join("objects");
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        for d in [&objects, &outside, &root.join("etc/real")] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(objects.join(Digest::of(b"one").to_hex()), b"one").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc/out")).unwrap();
        std::os::unix::fs::symlink("real", root.join("etc/in")).unwrap();
        let none = Path::new("/nonexistent");

        // Through a link out of the files root, at any depth: refused, nothing written.
        for target in ["/etc/out/x", "/etc/out/new/x"] {
            let err = install_files(&[entry(target, b"one", 0o600)], &objects, &root, &[], none)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(target) && err.contains("etc/out") && err.contains("outside"),
                "{err}"
            );
        }
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing written outside"
        );

        // A link that stays inside the root is followed, and checked where it leads.
        let installed = install_files(
            &[entry("/etc/in/x", b"one", 0o600)],
            &objects,
            &root,
            &[],
            none,
        )
        .unwrap();
        assert_eq!(fs::read(root.join("etc/real/x")).unwrap(), b"one");
        assert!(fs::symlink_metadata(root.join("etc/in"))
            .unwrap()
            .is_symlink());

        // A dropped file is never removed through a link out of the root either.
        fs::write(outside.join("x"), b"theirs").unwrap();
        install_files(&[], &objects, &root, &["/etc/out/x".into()], none).unwrap();
        assert_eq!(fs::read(outside.join("x")).unwrap(), b"theirs");
        install_files(&[], &objects, &root, &installed, none).unwrap();
        assert!(!root.join("etc/real/x").exists());
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
            serial: 0,
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
            tree: None,
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
