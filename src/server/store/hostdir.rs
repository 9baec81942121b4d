//! The chroot's [`HostRead`]: a host's keys opened relative to the chroot's root, open once,
//! so each file costs one short lookup (`<host>/<key>`) and not the root's whole path again
//! (`bento status` reads four or five files of every host of a fleet). What is read is what
//! [`ChrootStore`](super::ChrootStore) reads by path: server-written keys resolved as
//! before (the host's directory and the server's own layout are root's), host-written
//! `logs/` files through `server::logs`, which never follows a link (a host directory that
//! is itself a link sends those back to the path-based read, which says what it says).

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, CWD};

use super::chroot::{io_at, read_opened, read_prefix};
use super::{HostRead, Key, LogsError, StoreError};
use crate::protocol::HostName;
use crate::server::logs::{self, Stamped};
use crate::sys::stamp::Stamp;

/// Opens the chroot's root to read relative to; `None` when it cannot be (absent,
/// unreadable): reads go by path then, with their own errors.
pub(super) fn open_root(root: &Path) -> Option<OwnedFd> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    rustix::fs::openat(CWD, root, flags, Mode::empty()).ok()
}

/// One host's area, read relative to the chroot's root.
pub(super) struct HostDir<'a> {
    root: &'a OwnedFd,
    host: &'a HostName,
    /// Where the host's directory is, for messages and the path-based fallback.
    path: PathBuf,
}

impl<'a> HostDir<'a> {
    pub(super) fn new(root: &'a OwnedFd, host: &'a HostName, path: PathBuf) -> Self {
        Self { root, host, path }
    }

    /// Opens a server-written key; `None` when it does not exist.
    fn open_key(&self, key: &Key) -> Result<Option<(File, PathBuf)>, StoreError> {
        if let Key::Log(_) = key {
            return Err(StoreError::WrongOperation(key.path()));
        }
        let rel = key.path();
        let flags = OFlags::RDONLY | OFlags::CLOEXEC;
        let opened = rustix::fs::openat(
            self.root,
            format!("{}/{rel}", self.host),
            flags,
            Mode::empty(),
        );
        let path = self.path.join(&rel);
        match opened {
            Ok(fd) => Ok(Some((File::from(fd), path))),
            Err(e) if e == rustix::io::Errno::NOENT => Ok(None),
            Err(e) => Err(io_at(&path)(io::Error::from(e))),
        }
    }
}

impl HostRead for HostDir<'_> {
    fn get(&self, key: &Key, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match self.open_key(key)? {
            Some((file, path)) => read_opened(file, &path, limit).map(Some),
            None => Ok(None),
        }
    }

    fn get_prefix(&self, key: &Key, len: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match self.open_key(key)? {
            Some((file, path)) => read_prefix(file, &path, len).map(Some),
            None => Ok(None),
        }
    }

    fn read_logs_received(&self, names: &[&str]) -> Vec<Result<Stamped, LogsError>> {
        logs::read_each_at(self.root, self.host.as_str(), &self.path, names)
    }

    fn stamp(&self, key: &Key) -> Option<Stamp> {
        match key {
            // The server's own file, resolved as `open_key` resolves it.
            Key::Current => {
                let rel = [self.host.as_str(), "/", &key.path()].concat();
                let st = rustix::fs::statat(self.root, rel, rustix::fs::AtFlags::empty()).ok()?;
                let file = rustix::fs::FileType::from_raw_mode(st.st_mode).is_file();
                file.then(|| Stamp::of_stat(&st))
            }
            // The host's, by the rules its reads follow.
            Key::Log(name) => logs::stamp_at(self.root, self.host.as_str(), name.as_str()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8], len: u64) -> Vec<u8> {
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t.path(), bytes).unwrap();
        read_prefix(File::open(t.path()).unwrap(), t.path(), len).unwrap()
    }

    #[test]
    fn a_short_read_is_the_end_and_large_files_are_read_whole_up_to_the_bound() {
        assert_eq!(read(b"", 10), b"");
        assert_eq!(read(b"abc\n", 4096), b"abc\n");
        assert_eq!(read(b"abcdef", 4), b"abcd");
        assert_eq!(read(b"abcd", 4), b"abcd");
        // Larger than the first buffer: read on to the end, or to the bound.
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(read(&big, 1 << 20), big);
        assert_eq!(read(&big, 200_001), &big[..200_001]);
    }
}
