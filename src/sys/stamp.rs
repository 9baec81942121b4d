//! Which version of a file a read saw, for the caches that skip reading a file they read
//! before (the publisher's file hashes, `bento status`'s host files): device, inode, size,
//! and the modification and change times. Writing a file's bytes always moves its change
//! time (`ctime`), and no call sets that time to anything but the clock (a host may set its
//! files' modification time over SFTP, never this), so an equal stamp is equal bytes, once
//! the change time is old enough that a later write cannot fall in the same clock tick.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::binary::Reader;

/// How old a change must be before a stamp is trusted: file times move in clock ticks (a
/// few milliseconds here, up to two seconds on some file systems), so two writes within
/// one tick can leave the same times.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// The bytes [`Stamp::write`] appends.
pub const BYTES: usize = 5 * 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Stamp {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    }

    pub fn of_stat(st: &rustix::fs::Stat) -> Self {
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec as i64,
        }
    }

    /// The file's modification time.
    pub fn modified(&self) -> SystemTime {
        at(self.mtime_ns)
    }

    /// Whether the file's last change is more than [`RACY_WINDOW`] before `now` (the real
    /// clock's), so that any later write gives it another stamp.
    pub fn settled(&self, now: SystemTime) -> bool {
        now.duration_since(at(self.ctime_ns))
            .is_ok_and(|age| age > RACY_WINDOW)
    }

    /// Appends the stamp as five little-endian 64-bit numbers.
    pub fn write(&self, out: &mut Vec<u8>) {
        for n in [
            self.dev,
            self.ino,
            self.size,
            self.mtime_ns as u64,
            self.ctime_ns as u64,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
    }

    /// A stamp [`Stamp::write`] wrote; `None` when the bytes run out.
    pub fn read(r: &mut Reader<'_>) -> Option<Self> {
        Some(Self {
            dev: r.u64()?,
            ino: r.u64()?,
            size: r.u64()?,
            mtime_ns: r.u64()? as i64,
            ctime_ns: r.u64()? as i64,
        })
    }
}

fn at(ns: i64) -> SystemTime {
    match u64::try_from(ns) {
        Ok(ns) => UNIX_EPOCH + Duration::from_nanos(ns),
        Err(_) => UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_changes_the_stamp_and_a_fresh_change_is_not_settled() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, "one").unwrap();
        let first = Stamp::of(&std::fs::metadata(&f).unwrap());
        let st = rustix::fs::statat(rustix::fs::CWD, &f, rustix::fs::AtFlags::empty()).unwrap();
        assert_eq!(Stamp::of_stat(&st), first, "both ways of stating agree");
        assert!(!first.settled(SystemTime::now()), "just written");
        assert!(first.settled(SystemTime::now() + Duration::from_secs(3)));

        // Same size, and the modification time put back: the change time still moves.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&f, "two").unwrap();
        let file = std::fs::File::options().write(true).open(&f).unwrap();
        file.set_modified(first.modified()).unwrap();
        let second = Stamp::of(&std::fs::metadata(&f).unwrap());
        assert_eq!(second.mtime_ns, first.mtime_ns);
        assert_ne!(second, first);

        let mut bytes = b"m\n".to_vec();
        second.write(&mut bytes);
        assert_eq!(bytes.len(), 2 + BYTES);
        let mut r = Reader::after(&bytes, b"m\n").unwrap();
        assert_eq!(Stamp::read(&mut r), Some(second));
        assert!(r.is_empty());
        let mut short = Reader::after(&bytes[..bytes.len() - 1], b"m\n").unwrap();
        assert_eq!(Stamp::read(&mut short), None);
    }
}
