//! The server-side reader of a host's `logs/`, the one directory a (possibly compromised)
//! host can write. Everything that reads host-written files (status, report collection)
//! goes through here: entries are opened with `O_NOFOLLOW`, and anything that is not a
//! regular file with a single link is refused, so a planted symlink or hard link can never
//! make a root process read another host's chroot.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::protocol::layout::LOGS;
use crate::sys::stamp::Stamp;

/// Largest file `read` returns; a host must not be able to exhaust the server's memory.
pub const MAX_LOG_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: refused, {kind}")]
    Refused { path: PathBuf, kind: Refusal },
    #[error("{name:?} is not a plain file name in logs/")]
    BadName { name: String },
    #[error("{path}: larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
}

/// Why an entry of `logs/` is not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    Symlink,
    /// A regular file with more than one name: possibly another host's file linked in.
    HardLink,
    Directory,
    /// FIFO, socket or device.
    Special,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Symlink => "it is a symbolic link",
            Refusal::HardLink => "it is a hard link (more than one name)",
            Refusal::Directory => "it is a directory",
            Refusal::Special => "it is not a regular file",
        })
    }
}

/// One entry of `logs/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogEntry {
    pub name: String,
    /// Size for readable files.
    pub size: u64,
    /// Set when the entry will not be read.
    pub refused: Option<Refusal>,
    /// When the entry was last written (the chroot: its mtime), to judge liveness by.
    #[serde(skip)]
    pub modified: Option<std::time::SystemTime>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogsError + '_ {
    move |source| LogsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn refusal(meta: &fs::Metadata) -> Option<Refusal> {
    refusal_of(meta.mode(), meta.nlink())
}

/// What is refused of an entry with this mode and link count: anything but a regular file
/// with one name.
fn refusal_of(mode: u32, nlink: u64) -> Option<Refusal> {
    use rustix::fs::FileType;
    match FileType::from_raw_mode(mode) {
        FileType::Symlink => Some(Refusal::Symlink),
        FileType::Directory => Some(Refusal::Directory),
        FileType::RegularFile if nlink > 1 => Some(Refusal::HardLink),
        FileType::RegularFile => None,
        _ => Some(Refusal::Special),
    }
}

/// Opens `path` without following a final symlink and without blocking on a FIFO.
fn open_nofollow(path: &Path, extra: libc::c_int) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | extra)
        .open(path)
}

/// The `logs/` directory of a host directory, refusing it if it is itself a link. The host
/// directory is root-owned, so the host cannot swap `logs/` after this check.
fn logs_dir(host_dir: &Path) -> Result<PathBuf, LogsError> {
    open_logs(host_dir).map(|(dir, _)| dir)
}

/// [`logs_dir`], and the directory open, to open its entries through.
fn open_logs(host_dir: &Path) -> Result<(PathBuf, File), LogsError> {
    let dir = host_dir.join(LOGS);
    match open_nofollow(&dir, libc::O_DIRECTORY) {
        Ok(open) => Ok((dir, open)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            let kind = match fs::symlink_metadata(&dir) {
                Ok(m) => refusal(&m).unwrap_or(Refusal::Special),
                Err(e) => return Err(io_err(&dir)(e)),
            };
            Err(LogsError::Refused { path: dir, kind })
        }
        Err(e) => Err(io_err(&dir)(e)),
    }
}

/// Lists `<host_dir>/logs/`, sorted by name, marking entries that `read` would refuse.
pub fn list(host_dir: &Path) -> Result<Vec<LogEntry>, LogsError> {
    let dir = logs_dir(host_dir)?;
    list_dir(&dir, &dir)
}

/// Lists the directory `through` names (`shown` in messages), never following an entry.
fn list_dir(through: &Path, shown: &Path) -> Result<Vec<LogEntry>, LogsError> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(through).map_err(io_err(shown))? {
        let entry = entry.map_err(io_err(shown))?;
        // symlink_metadata is lstat: it describes the link, never its target.
        let meta = match fs::symlink_metadata(entry.path()) {
            Ok(m) => m,
            // Removed by the host in the meantime.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&shown.join(entry.file_name()))(e)),
        };
        let refused = refusal(&meta);
        entries.push(LogEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            size: if refused.is_none() { meta.len() } else { 0 },
            refused,
            modified: meta.modified().ok(),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// Reads `<host_dir>/logs/<name>` (at most `MAX_LOG_BYTES`), refusing links and anything
/// that is not a regular file with one name. The checks are made on the opened file, so
/// the host cannot swap the entry between check and read.
pub fn read(host_dir: &Path, name: &str) -> Result<Vec<u8>, LogsError> {
    check_name(name)?;
    let (dir, open) = open_logs(host_dir)?;
    read_entry(&dir, &open, name).map(|(bytes, _)| bytes)
}

/// Reads each of `names` in `<host_dir>/logs/` as [`read`] does, with its modification
/// time (when the server received it), checking `logs/` itself once for all of them.
pub fn read_each(host_dir: &Path, names: &[&str]) -> Vec<Result<Received, LogsError>> {
    let logs = open_logs(host_dir);
    names
        .iter()
        .map(|name| {
            check_name(name)?;
            match &logs {
                Ok((dir, open)) => read_entry(dir, open, name),
                // Refused or unreadable: each entry says so as `read` would (the error
                // holds an `io::Error`, which does not clone).
                Err(_) => read(host_dir, name).map(|bytes| (bytes, None)),
            }
        })
        .collect()
}

/// [`read_each`] of the host directory `host_dir`, which is `<host>` in the directory
/// `root` is open on: each file is opened in one lookup that refuses a link anywhere on
/// the way (`<host>`, `logs/` or the file: `openat2`'s `RESOLVE_NO_SYMLINKS`), then checked
/// and read on the open file as [`read`] does. A file that lookup does not open (absent,
/// refused, a host directory that is a link, a kernel without `openat2`) is read again as
/// `read_each` reads it, so every error and refusal says what it says there.
pub fn read_each_at(
    root: impl AsFd,
    host: &str,
    host_dir: &Path,
    names: &[&str],
) -> Vec<Result<Stamped, LogsError>> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
    names
        .iter()
        .map(|name| {
            check_name(name)?;
            let opened = rustix::fs::openat2(
                &root,
                format!("{host}/{LOGS}/{name}"),
                flags | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH,
            );
            match opened {
                Ok(fd) => read_opened(File::from(fd), host_dir.join(LOGS).join(name))
                    .map(|(read, stamp)| (read, Some(stamp))),
                Err(_) => read_each(host_dir, &[name])
                    .pop()
                    .expect("one result per name")
                    .map(|read| (read, None)),
            }
        })
        .collect()
}

/// The stamp `<host>/logs/<name>` has now (`root` as for [`read_each_at`]), when it is a
/// file [`read_each_at`] would read: not a link, a regular file with one name. `None`
/// otherwise; the read then says why. One `stat`, so the host's own entry is never
/// followed; `<host>` and `logs/` are not the host's to swap (their parents are root's).
pub fn stamp_at(root: impl AsFd, host: &str, name: &str) -> Option<Stamp> {
    use rustix::fs::AtFlags;
    check_name(name).ok()?;
    let path = format!("{host}/{LOGS}/{name}");
    let st = rustix::fs::statat(root, path, AtFlags::SYMLINK_NOFOLLOW).ok()?;
    refusal_of(st.st_mode, st.st_nlink)
        .is_none()
        .then(|| Stamp::of_stat(&st))
}

/// A file's bytes and when it was last written (`None` where the system does not say).
pub type Received = (Vec<u8>, Option<std::time::SystemTime>);

/// What [`read_each_at`] read, with the stamp the open file had before it was read (for
/// `bento status`'s memo); `None` when it was read by path.
pub type Stamped = (Received, Option<Stamp>);

/// Opens `name` in `logs/` (`open`, found at `dir`) without following a link and reads it.
/// Relative to the open directory: no lookup of the chroot's path again for every file.
fn read_entry(dir: &Path, open: &File, name: &str) -> Result<Received, LogsError> {
    use rustix::fs::{Mode, OFlags};
    let path = dir.join(name);
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
    let file = match rustix::fs::openat(open, name, flags | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => File::from(fd),
        Err(e) if e == rustix::io::Errno::LOOP => {
            return Err(LogsError::Refused {
                path,
                kind: Refusal::Symlink,
            })
        }
        Err(e) => return Err(io_err(&path)(e.into())),
    };
    read_opened(file, path).map(|(read, _)| read)
}

/// The checks and the bounded read of an entry opened without following links; made on
/// the open file, so the host cannot swap the entry between check and read.
fn read_opened(file: File, path: PathBuf) -> Result<(Received, Stamp), LogsError> {
    let meta = file.metadata().map_err(io_err(&path))?;
    if let Some(kind) = refusal(&meta) {
        return Err(LogsError::Refused { path, kind });
    }
    if meta.len() > MAX_LOG_BYTES {
        return Err(LogsError::TooLarge {
            path,
            max: MAX_LOG_BYTES,
        });
    }
    // The size the open file had when checked, and no more: a host still appending cannot
    // push the read past the cap, and a file read whole costs one read, not a second one
    // to find its end (two files of every host in a fleet's status).
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(meta.len())
        .read_to_end(&mut bytes)
        .map_err(io_err(&path))?;
    Ok(((bytes, meta.modified().ok()), Stamp::of(&meta)))
}

/// Lists `<host_dir>/logs/<sub>/` (e.g. `reports`), like [`list`]. The host owns `logs/`
/// and could swap `<sub>` for a link at any moment, so the directory is opened once, without
/// following links, and listed and read through that open descriptor only.
pub fn list_in(host_dir: &Path, sub: &str) -> Result<Vec<LogEntry>, LogsError> {
    let (dir, path) = open_sub(host_dir, sub)?;
    list_dir(&fd_path(&dir), &path)
}

/// Reads `<host_dir>/logs/<sub>/<name>` with the checks of [`read`], through the
/// subdirectory opened once (see [`list_in`]).
pub fn read_in(host_dir: &Path, sub: &str, name: &str) -> Result<Vec<u8>, LogsError> {
    check_name(name)?;
    let (dir, dir_path) = open_sub(host_dir, sub)?;
    let path = dir_path.join(name);
    let file = match open_nofollow(&fd_path(&dir).join(name), 0) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(LogsError::Refused {
                path,
                kind: Refusal::Symlink,
            })
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    read_opened(file, path).map(|((bytes, _), _)| bytes)
}

fn check_name(name: &str) -> Result<(), LogsError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(LogsError::BadName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Opens `logs/<sub>` as a directory without following a link.
fn open_sub(host_dir: &Path, sub: &str) -> Result<(File, PathBuf), LogsError> {
    check_name(sub)?;
    let path = logs_dir(host_dir)?.join(sub);
    match open_nofollow(&path, libc::O_DIRECTORY) {
        Ok(f) => Ok((f, path)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            let kind = match fs::symlink_metadata(&path) {
                Ok(m) => refusal(&m).unwrap_or(Refusal::Special),
                Err(e) => return Err(io_err(&path)(e)),
            };
            Err(LogsError::Refused { path, kind })
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// A path that names the directory `dir` is open on, whatever has been renamed or swapped
/// since: the kernel resolves `/proc/self/fd/N` to the open directory itself.
fn fd_path(dir: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().join("alpha");
        let other = tmp.path().join("beta");
        fs::create_dir_all(host.join(LOGS)).unwrap();
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("secret"), "beta's secret\n").unwrap();
        (tmp, host, other)
    }

    #[test]
    fn a_stamp_is_what_the_read_stamped_and_a_link_or_a_second_name_has_none() {
        let (tmp, host, other) = setup();
        let logs = host.join(LOGS);
        fs::write(logs.join("heartbeat.json"), "{}").unwrap();
        // A link to a file with one name: only not following it refuses it.
        fs::write(other.join("notes"), "beta's notes\n").unwrap();
        symlink(other.join("notes"), logs.join("latest.json")).unwrap();
        fs::hard_link(other.join("secret"), logs.join("planted.json")).unwrap();
        let root = File::open(tmp.path()).unwrap();
        let names = ["heartbeat.json", "latest.json", "planted.json"];
        let read = read_each_at(&root, "alpha", &host, &names);
        let stamped = read[0].as_ref().map(|(_, stamp)| *stamp).unwrap();
        assert_eq!(stamp_at(&root, "alpha", "heartbeat.json"), stamped);
        assert!(stamped.is_some());
        for (name, read) in names.iter().zip(&read).skip(1) {
            assert!(read.is_err(), "{name} is refused by the read");
            assert_eq!(stamp_at(&root, "alpha", name), None, "{name} has no stamp");
        }
        assert_eq!(stamp_at(&root, "alpha", "../beta/secret"), None);
    }

    #[test]
    fn reads_regular_files_and_refuses_links() {
        let (_tmp, host, other) = setup();
        let logs = host.join(LOGS);
        fs::write(logs.join("report.json"), "{}\n").unwrap();
        symlink(other.join("secret"), logs.join("sym")).unwrap();
        fs::hard_link(other.join("secret"), logs.join("hard")).unwrap();
        fs::create_dir(logs.join("sub")).unwrap();
        unix::unistd::mkfifo(
            &logs.join("fifo"),
            unix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();

        assert_eq!(read(&host, "report.json").unwrap(), b"{}\n");
        let refused = |name: &str| match read(&host, name) {
            Err(LogsError::Refused { kind, .. }) => kind,
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(refused("sym"), Refusal::Symlink);
        assert_eq!(refused("hard"), Refusal::HardLink);
        assert_eq!(refused("sub"), Refusal::Directory);
        assert_eq!(refused("fifo"), Refusal::Special);
        for bad in ["", "..", "../beta/secret", "a/b"] {
            assert!(
                matches!(read(&host, bad), Err(LogsError::BadName { .. })),
                "{bad}"
            );
        }

        let listed = list(&host).unwrap();
        let summary: Vec<(&str, Option<Refusal>)> = listed
            .iter()
            .map(|e| (e.name.as_str(), e.refused))
            .collect();
        assert_eq!(
            summary,
            [
                ("fifo", Some(Refusal::Special)),
                ("hard", Some(Refusal::HardLink)),
                ("report.json", None),
                ("sub", Some(Refusal::Directory)),
                ("sym", Some(Refusal::Symlink)),
            ]
        );
        assert_eq!(listed[2].size, 3);
    }

    #[test]
    fn read_each_gives_each_file_its_own_time_and_refusal() {
        let (_tmp, host, other) = setup();
        let logs = host.join(LOGS);
        fs::write(logs.join("a.json"), "a").unwrap();
        fs::write(logs.join("b.json"), "bb").unwrap();
        let at = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        File::options()
            .write(true)
            .open(logs.join("b.json"))
            .unwrap()
            .set_modified(at)
            .unwrap();
        symlink(other.join("secret"), logs.join("c.json")).unwrap();
        let read = read_each(&host, &["a.json", "b.json", "c.json", "d.json", "../x"]);
        assert_eq!(read.len(), 5);
        let (a, a_at) = read[0].as_ref().unwrap();
        assert_eq!((a.as_slice(), a_at.is_some()), (&b"a"[..], true));
        assert_eq!(read[1].as_ref().unwrap(), &(b"bb".to_vec(), Some(at)));
        assert!(matches!(
            read[2],
            Err(LogsError::Refused {
                kind: Refusal::Symlink,
                ..
            })
        ));
        assert!(
            matches!(&read[3], Err(LogsError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound)
        );
        assert!(matches!(read[4], Err(LogsError::BadName { .. })));
        // logs/ itself a link: every file refused, none read through it.
        fs::remove_dir_all(&logs).unwrap();
        symlink(&other, &logs).unwrap();
        for r in read_each(&host, &["secret", "secret"]) {
            assert!(matches!(
                r,
                Err(LogsError::Refused {
                    kind: Refusal::Symlink,
                    ..
                })
            ));
        }
    }

    #[test]
    fn refuses_a_logs_dir_that_is_a_link() {
        let (_tmp, host, other) = setup();
        fs::remove_dir(host.join(LOGS)).unwrap();
        symlink(&other, host.join(LOGS)).unwrap();
        assert!(matches!(
            list(&host),
            Err(LogsError::Refused {
                kind: Refusal::Symlink,
                ..
            })
        ));
        assert!(matches!(
            read(&host, "secret"),
            Err(LogsError::Refused {
                kind: Refusal::Symlink,
                ..
            })
        ));
    }
}
