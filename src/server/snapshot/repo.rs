//! Opening things in the fleet repo without following links. Each directory is opened
//! relative to its parent's descriptor with `O_NOFOLLOW | O_DIRECTORY`, each file with
//! `O_NOFOLLOW`, and a symlink's target is resolved by hand, one component at a time (see
//! `Scanner::resolve`). A path is looked up once, component by component, so a directory
//! swapped for a symlink while a publish runs makes the open fail (`ELOOP`, `ENOTDIR`): no
//! swap can make bento read outside the repo. Only `rustix`'s safe wrappers are used.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};

use rustix::fs::{AtFlags, Mode, OFlags, Stat, CWD};

/// A directory to list.
const DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
/// A directory only passed through (needs search permission, not read).
const PASS: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
/// A file to read. `NONBLOCK`: a FIFO swapped in after the check opens without hanging
/// (and is then refused as not a regular file).
const FILE: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// Opens `path` (absolute or relative to the working directory) as a directory to list;
/// its last component must not be a link.
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(CWD, path, DIR, Mode::empty())?)
}

/// Opens the directory `name` of `dir`, refusing a link.
pub fn open_dir_at(dir: impl AsFd, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(dir, name, DIR, Mode::empty())?)
}

/// Opens the file `name` of `dir` for reading, refusing a link.
pub fn open_file_at(dir: impl AsFd, name: &OsStr) -> io::Result<File> {
    Ok(File::from(rustix::fs::openat(
        dir,
        name,
        FILE,
        Mode::empty(),
    )?))
}

/// `lstat` of `name` in `dir`.
pub fn stat_at(dir: impl AsFd, name: &OsStr) -> io::Result<Stat> {
    Ok(rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

/// The target of the link `name` in `dir`.
pub fn read_link_at(dir: impl AsFd, name: &OsStr) -> io::Result<std::path::PathBuf> {
    let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
    Ok(OsStr::from_bytes(target.as_bytes()).into())
}

/// The names in `dir`, without `.` and `..`, unsorted.
pub fn list(dir: impl AsFd) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    Ok(names)
}

fn not_plain(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: not a plain resolved path", path.display()),
    )
}

/// Opens the directory at `rel` below `root`, one real directory at a time (`rel` holds no
/// `.`, `..` or links: it is a path the scanner resolved). An empty `rel` is `root` itself.
pub fn open_dir_beneath(root: impl AsFd, rel: &Path) -> io::Result<OwnedFd> {
    let mut names = rel.components().map(|c| match c {
        Component::Normal(name) => Ok(name),
        _ => Err(not_plain(rel)),
    });
    // The first step from `root` itself, not from a reopened `.`: one lookup fewer.
    let mut dir = match names.next() {
        None => return root.as_fd().try_clone_to_owned(),
        Some(name) => open_dir_at(&root, name?)?,
    };
    for name in names {
        dir = open_dir_at(&dir, name?)?;
    }
    Ok(dir)
}

/// Opens a file of the fleet repo by the path the scanner resolved it to (absolute, with no
/// links in it), walking from `/` without following any link, and checks it is still a
/// regular file with one name. Every later read of a scanned file goes through here, so a
/// directory swapped for a link between the scan and the copy fails the open.
pub fn open_resolved_file(path: &Path) -> io::Result<File> {
    let mut parts = path.components();
    if parts.next() != Some(Component::RootDir) {
        return Err(not_plain(path));
    }
    let names: Vec<&OsStr> = parts
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            _ => Err(not_plain(path)),
        })
        .collect::<io::Result<_>>()?;
    let Some((last, dirs)) = names.split_last() else {
        return Err(not_plain(path));
    };
    let mut dir = rustix::fs::openat(CWD, "/", PASS, Mode::empty())?;
    for name in dirs {
        dir = rustix::fs::openat(&dir, *name, PASS, Mode::empty())?;
    }
    let file = open_file_at(&dir, last)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file any more",
        ));
    }
    if meta.nlink() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("has {} hard links now", meta.nlink()),
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(t.path()).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), "x").unwrap();
        std::fs::create_dir(root.join("outside")).unwrap();
        std::fs::write(root.join("outside/f"), "secret").unwrap();
        std::os::unix::fs::symlink("../outside", root.join("a/l")).unwrap();

        let mut s = String::new();
        std::io::Read::read_to_string(
            &mut open_resolved_file(&root.join("a/b/f")).unwrap(),
            &mut s,
        )
        .unwrap();
        assert_eq!(s, "x");
        assert!(open_resolved_file(&root.join("a/l/f")).is_err());
        assert!(open_resolved_file(&root.join("a/../a/b/f")).is_err());
        let fd = open_root(&root).unwrap();
        assert!(open_dir_beneath(&fd, Path::new("a/b")).is_ok());
        assert!(open_dir_beneath(&fd, Path::new("a/l")).is_err());
        assert!(open_file_at(
            open_dir_beneath(&fd, Path::new("a")).unwrap(),
            OsStr::new("l")
        )
        .is_err());
        let mut names = list(&fd).unwrap();
        names.sort();
        assert_eq!(names, ["a", "outside"]);
    }
}
