//! What `bento build` remembers per host in `<chroot>/.bento/builds/<host>.json`: the
//! expected system (and derivation) and the content key of the configuration it was built
//! from, so a build of a tree that has since changed is recognised as stale and not used.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::nix::StorePath;
use crate::protocol::layout::Chroot;
use crate::protocol::manifest::{Build, ConfigEntry, Digest};
use crate::protocol::HostName;

pub const BUILDS_DIR: &str = "builds";
pub const RECORD_FORMAT: u32 = 1;

/// One host's newest build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub format: u32,
    pub host: HostName,
    /// `content_key` of the configuration that was built.
    pub key: String,
    /// The system store path; for `--dry`, where it will be once built.
    pub system: Option<StorePath>,
    /// The derivation (recorded by `--dry`).
    pub drv: Option<StorePath>,
    /// Whether `system` was built and is in this server's store.
    pub built: bool,
    /// RFC 3339 time of the build.
    pub time: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a build record: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// `<chroot>/.bento/builds/`.
pub fn builds_dir(chroot: &Chroot) -> PathBuf {
    chroot.state_dir().join(BUILDS_DIR)
}

pub fn record_path(chroot: &Chroot, host: &HostName) -> PathBuf {
    builds_dir(chroot).join(format!("{host}.json"))
}

/// A key for "the same configuration": the build kind and every config entry (paths, kinds,
/// hashes, executable bits), exactly what a manifest's `config` holds. Files installed
/// outside the store (`files`) do not change the system, so they are not part of it.
pub fn content_key(build: Build, config: &[ConfigEntry]) -> String {
    let bytes = serde_json::to_vec(&(build, config)).expect("config serialises");
    Digest::of(&bytes).to_hex()
}

/// Reads a host's record; `None` when it has none.
pub fn read(chroot: &Chroot, host: &HostName) -> Result<Option<BuildRecord>, RecordError> {
    let path = record_path(chroot, host);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| RecordError::Parse { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RecordError::Io { path, source }),
    }
}

/// Writes a host's record atomically (the state directory is root-only).
pub fn write(chroot: &Chroot, record: &BuildRecord) -> Result<(), RecordError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = builds_dir(chroot);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| RecordError::Io { path, source }
    };
    // As publish makes them: the chroot root 0755 (sshd and the hosts pass through it), the
    // state directory and everything in it root-only.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&chroot.root)
        .map_err(io(&chroot.root))?;
    for d in [chroot.state_dir(), dir.clone()] {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&d)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(io(&d))?;
    }
    let path = record_path(chroot, &record.host);
    let mut bytes = serde_json::to_vec_pretty(record).expect("record serialises");
    bytes.push(b'\n');
    crate::sys::atomic::write_file(&path, &bytes, 0o600).map_err(io(&path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::manifest::RelPath;

    #[test]
    fn round_trip_and_key() {
        let tmp = tempfile::tempdir().unwrap();
        let chroot = Chroot::new(tmp.path());
        let host = HostName::new("alpha").unwrap();
        assert_eq!(read(&chroot, &host).unwrap(), None);
        let dir = vec![ConfigEntry::Directory {
            path: RelPath::new("common").unwrap(),
        }];
        let rec = BuildRecord {
            format: RECORD_FORMAT,
            host: host.clone(),
            key: content_key(Build::Flake, &dir),
            system: Some(
                StorePath::new("/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-alpha-1")
                    .unwrap(),
            ),
            drv: None,
            built: true,
            time: "2026-11-25T12:00:00Z".into(),
        };
        write(&chroot, &rec).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&chroot.state_dir()), 0o700);
        assert_eq!(mode(&builds_dir(&chroot)), 0o700);
        assert_eq!(read(&chroot, &host).unwrap(), Some(rec.clone()));
        assert_ne!(rec.key, content_key(Build::Classic, &dir));
        assert_ne!(rec.key, content_key(Build::Flake, &[]));
    }
}
