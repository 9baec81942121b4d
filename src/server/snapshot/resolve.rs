//! Links resolved by hand, one component at a time, never leaving the fleet repo.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use rustix::fs::FileType;

use super::{repo, Scanner, SnapshotError};

/// Links followed while resolving one path before it counts as a loop (Linux's limit).
const MAX_HOPS: u32 = 40;

/// What a path resolved to inside the repo.
pub(super) enum Target {
    Dir,
    File,
    Other(FileType),
}

impl Scanner {
    /// Resolves `target`, the text of the link `link` in the directory `dir` (both relative
    /// to the root), by hand: one component at a time, each looked up without following it
    /// in the directory resolved so far, `..` taken off that resolved path. Returns the real
    /// path relative to the root and what is there. Never leaves the root.
    pub(super) fn resolve(
        &self,
        dir: &Path,
        target: &Path,
        link: &Path,
    ) -> Result<(PathBuf, Target), SnapshotError> {
        let root_fd = self.root_fd()?;
        let io_err = |source| SnapshotError::Io {
            path: link.to_owned(),
            source,
        };
        let mut real: Vec<OsString> = dir.iter().map(OsStr::to_owned).collect();
        let mut todo: Vec<OsString> = Vec::new();
        self.push_target(&mut real, &mut todo, target, link)?;
        let mut hops = 0;
        let mut found = Target::Dir;
        // `todo` is a stack: the next component is last.
        while let Some(part) = todo.pop() {
            if !matches!(found, Target::Dir) {
                return Err(io_err(io::Error::from_raw_os_error(libc::ENOTDIR)));
            }
            if part == ".." {
                if real.pop().is_none() {
                    return Err(SnapshotError::Escape {
                        link: link.to_owned(),
                        target: lexical(&self.root.join(dir).join(target)),
                    });
                }
                continue;
            }
            let here: PathBuf = real.iter().collect();
            let dir_fd = repo::open_dir_beneath(root_fd, &here).map_err(io_err)?;
            let st = match repo::stat_at(&dir_fd, &part) {
                Ok(st) => st,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(SnapshotError::Dangling {
                        link: link.to_owned(),
                        target: target.to_owned(),
                    })
                }
                Err(e) => return Err(io_err(e)),
            };
            found = match FileType::from_raw_mode(st.st_mode) {
                FileType::Symlink => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(SnapshotError::Loop {
                            link: link.to_owned(),
                        });
                    }
                    let next = repo::read_link_at(&dir_fd, &part).map_err(io_err)?;
                    self.push_target(&mut real, &mut todo, &next, link)?;
                    Target::Dir
                }
                FileType::Directory => {
                    real.push(part);
                    Target::Dir
                }
                FileType::RegularFile => {
                    real.push(part);
                    Target::File
                }
                ft => {
                    real.push(part);
                    Target::Other(ft)
                }
            };
        }
        Ok((real.iter().collect(), found))
    }

    /// Queues the components of a link's `target`. An absolute target restarts from the
    /// root when it names a path inside the repo; one naming a path outside is refused,
    /// unless the system resolves it back into the repo (`/home/me/fleet` linked to the
    /// canonical root), in which case the part inside is resolved by hand like any other.
    fn push_target(
        &self,
        real: &mut Vec<OsString>,
        todo: &mut Vec<OsString>,
        target: &Path,
        link: &Path,
    ) -> Result<(), SnapshotError> {
        let mut inside = target;
        let canonical;
        if target.is_absolute() {
            match target.strip_prefix(&self.root) {
                Ok(rest) => inside = rest,
                Err(_) => {
                    // Only to learn where the system would go: nothing is read there.
                    canonical = match fs::canonicalize(target) {
                        Ok(c) => c,
                        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                            return Err(SnapshotError::Loop {
                                link: link.to_owned(),
                            })
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            return Err(SnapshotError::Dangling {
                                link: link.to_owned(),
                                target: target.to_owned(),
                            })
                        }
                        Err(source) => {
                            return Err(SnapshotError::Io {
                                path: link.to_owned(),
                                source,
                            })
                        }
                    };
                    inside =
                        canonical
                            .strip_prefix(&self.root)
                            .map_err(|_| SnapshotError::Escape {
                                link: link.to_owned(),
                                target: canonical.clone(),
                            })?;
                }
            }
            real.clear();
        }
        let start = todo.len();
        for c in inside.components() {
            match c {
                Component::Normal(name) => todo.push(name.to_owned()),
                Component::ParentDir => todo.push("..".into()),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
        todo[start..].reverse();
        Ok(())
    }
}

/// `path` with `.` and `..` taken off lexically (for messages).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}
