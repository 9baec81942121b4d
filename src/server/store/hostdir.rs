//! The chroot's [`HostRead`]: a host's keys opened relative to the chroot's root, open once,
//! so each file costs one short lookup (`<host>/<key>`) and not the root's whole path again
//! (`bento status` reads four or five files of every host of a fleet). What is read is what
//! [`ChrootStore`](super::ChrootStore) reads by path: server-written keys resolved as
//! before (the host's directory and the server's own layout are root's), host-written
//! `logs/` files through `server::logs`, which never follows a link (a host directory that
//! is itself a link sends those back to the path-based read, which says what it says).

use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, CWD};

use super::chroot::io_at;
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

/// The most a bounded read reserves before it knows a file's size: larger files grow the
/// buffer as they are read.
const READ_AHEAD: u64 = 64 * 1024;

/// Reads at most `limit` bytes of `path`; `None` when it does not exist.
pub(super) fn read_bounded(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::File::open(path) {
        Ok(f) => read_opened(f, path, limit).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at(path)(e)),
    }
}

/// Reads at most `limit` bytes of `file` (opened on `path`, for messages).
pub(super) fn read_opened(file: fs::File, path: &Path, limit: u64) -> Result<Vec<u8>, StoreError> {
    let bytes = read_short(file, path, limit.saturating_add(1))?;
    if bytes.len() as u64 > limit {
        return Err(StoreError::TooLarge {
            at: path.to_owned(),
            max: limit,
        });
    }
    Ok(bytes)
}

/// The first `len` bytes of `file` (all of it when shorter; opened on `path`).
pub(super) fn read_prefix(file: fs::File, path: &Path, len: u64) -> Result<Vec<u8>, StoreError> {
    read_short(file, path, len)
}

/// Reads at most `len` bytes of a server-written file, taking a short read as its end: what
/// the server writes here is renamed into place whole and never appended to, and a regular
/// file's read comes back short only at its end. That spares the read that would only see
/// the end (10,000 of them for `current`, and as many for manifests, in a fleet's status;
/// several per host in a publish).
fn read_short(file: fs::File, path: &Path, len: u64) -> Result<Vec<u8>, StoreError> {
    // Read into the buffer's spare room: nothing is zeroed first.
    let mut bytes = Vec::with_capacity(len.min(READ_AHEAD) as usize);
    loop {
        let room = bytes.capacity() - bytes.len();
        let asked = if room > 0 {
            room
        } else if (bytes.len() as u64) < len {
            // A large file: room for the rest, in growing steps.
            let more = (len - bytes.len() as u64).min(bytes.len().max(4096) as u64) as usize;
            bytes.reserve_exact(more);
            bytes.capacity() - bytes.len()
        } else {
            break;
        };
        let n = match rustix::io::read(&file, rustix::buffer::spare_capacity(&mut bytes)) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io_at(path)(io::Error::from(e))),
        };
        if n < asked {
            break;
        }
    }
    bytes.truncate(len.try_into().unwrap_or(usize::MAX));
    Ok(bytes)
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
