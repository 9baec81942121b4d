//! Reading a host's tree out of the fleet repo: symlinks resolved (the host never needs the
//! rest of the repo), links that leave the repo, dangle or loop refused by name, `.git`,
//! `result*` links and editor droppings skipped, every file hashed. Directories reached
//! through many links (a `common/` shared by 1,000 hosts) are read once per run, and file
//! hashes are cached across runs by inode, size, mtime and ctime.
//!
//! Invariant: every byte read comes from inside the repo. The repo is read through
//! directory descriptors opened from the root's, never by path (`repo`), and each link is
//! resolved once, by hand, within the root: so a directory swapped for a symlink during a
//! publish fails the read instead of reaching outside.

mod cache;
mod keys;
pub mod repo;
mod resolve;

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustix::fs::FileType;

pub use cache::{hash_file, hash_reader, HashCache, Hashed};

use crate::protocol::manifest::Digest;
use resolve::Target;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("symlink {link} points to {target}, which does not exist")]
    Dangling { link: PathBuf, target: PathBuf },
    #[error("symlink {link} points to {target}, outside the fleet repo")]
    Escape { link: PathBuf, target: PathBuf },
    #[error("symlink {link} makes a loop")]
    Loop { link: PathBuf },
    #[error("{path}: file name is not valid UTF-8")]
    NotUtf8 { path: PathBuf },
    #[error("{path}: is a {what}; only regular files, directories and symlinks can be published")]
    Special { path: PathBuf, what: &'static str },
    #[error("{path}: has {links} hard links; bento cannot tell where the others are (perhaps outside the fleet repo), so copy the file instead")]
    HardLink { path: PathBuf, links: u64 },
    #[error("{path}: is {size} bytes, more than the {limit}-byte limit for one file")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
}

/// One thing found in a tree, with its path relative to the scanned directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Shared: a directory every host links to is flattened once, its items' paths (and
    /// the plans' paths made from them) kept once for all hosts.
    pub path: Arc<str>,
    pub kind: ItemKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemKind {
    Dir,
    File {
        /// The real file the content comes from: an absolute path with every link
        /// resolved. Read it only with [`repo::open_resolved_file`], which follows none.
        source: Arc<Path>,
        size: u64,
        sha256: Digest,
        executable: bool,
    },
}

/// True for names that are never published: VCS data and editor droppings.
pub fn is_skipped_name(name: &str) -> bool {
    name == ".git"
        || name == ".DS_Store"
        || name.ends_with('~')
        || (name.starts_with('#') && name.ends_with('#'))
        || name.starts_with(".#")
        || (name.starts_with('.')
            && (name.ends_with(".swp") || name.ends_with(".swo") || name.ends_with(".swx")))
}

/// `nix build` leaves `result` / `result-*` links behind; they point into the store.
fn is_result_link(name: &str) -> bool {
    name == "result" || name.starts_with("result-")
}

/// A link's name and the resolved path of the tree it links.
type LinkedAs = (String, PathBuf);

/// Scans directories of one fleet repo. Shared by all hosts of a publish run.
pub struct Scanner {
    root: PathBuf,
    /// The repo root, opened once; every read starts from it.
    root_fd: io::Result<OwnedFd>,
    cache: HashCache,
    /// Trees by their resolved path relative to the root.
    memo: Mutex<HashMap<PathBuf, Arc<Vec<Item>>>>,
    /// A linked tree's items under the name a link gives it, by that name and the tree's
    /// resolved path (as in `memo`).
    flat: Mutex<HashMap<LinkedAs, Arc<[Item]>>>,
    /// Contents that hold a private key (found while hashing).
    private_keys: Mutex<BTreeSet<Digest>>,
    now: SystemTime,
}

impl Scanner {
    /// `root` is the fleet repo root; it must be canonical (no symlinks in it).
    pub fn new(root: PathBuf, cache: HashCache, now: SystemTime) -> Self {
        Self {
            root_fd: repo::open_root(&root),
            root,
            cache,
            memo: Mutex::new(HashMap::new()),
            flat: Mutex::default(),
            private_keys: Mutex::default(),
            now,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn cache(&self) -> &HashCache {
        &self.cache
    }

    /// Whether a scanned file with this content holds a private key.
    pub fn holds_private_key(&self, digest: &Digest) -> bool {
        self.private_keys
            .lock()
            .expect("keys lock")
            .contains(digest)
    }

    /// A path as the user knows it: relative to the fleet repo root when inside it.
    pub fn display(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.root)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| path.to_path_buf())
    }

    fn root_fd(&self) -> Result<&OwnedFd, SnapshotError> {
        self.root_fd.as_ref().map_err(|e| SnapshotError::Io {
            path: self.root.clone(),
            source: io::Error::new(e.kind(), e.to_string()),
        })
    }

    /// All items under `dir` (a directory inside the repo, or a link to one), sorted by path.
    pub fn scan(&self, dir: &Path) -> Result<Arc<Vec<Item>>, SnapshotError> {
        let rel = self.display(dir);
        // `hosts/<name>` may itself be a link: resolved like any other.
        let (real, target) = self.resolve(Path::new(""), &rel, &rel)?;
        if !matches!(target, Target::Dir) {
            return Err(SnapshotError::Io {
                path: rel,
                source: io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }
        let fd =
            repo::open_dir_beneath(self.root_fd()?, &real).map_err(|source| SnapshotError::Io {
                path: real.clone(),
                source,
            })?;
        let mut stack = vec![real.clone()];
        self.walk(&real, &fd, &mut stack)
    }

    /// The names in `dir` (inside the repo) that are directories or links to directories,
    /// read like everything else: through the root's descriptor, links resolved by hand. A
    /// link that leaves the repo or loops is listed, so scanning it names the problem; one
    /// that dangles or names a file is not.
    pub fn subdirs(&self, dir: &Path) -> Result<Vec<String>, SnapshotError> {
        let rel = self.display(dir);
        let io_err = |source| SnapshotError::Io {
            path: rel.clone(),
            source,
        };
        let (real, _) = self.resolve(Path::new(""), &rel, &rel)?;
        let fd = repo::open_dir_beneath(self.root_fd()?, &real).map_err(io_err)?;
        let mut dirs = Vec::new();
        for name in repo::list(&fd).map_err(io_err)? {
            let Some(text) = name.to_str() else { continue };
            let st = repo::stat_at(&fd, &name).map_err(io_err)?;
            let is_dir = match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => true,
                FileType::Symlink => {
                    let target = repo::read_link_at(&fd, &name).map_err(io_err)?;
                    match self.resolve(&real, &target, &rel.join(&name)) {
                        Ok((_, found)) => matches!(found, Target::Dir),
                        Err(SnapshotError::Dangling { .. }) => false,
                        Err(_) => true,
                    }
                }
                _ => false,
            };
            if is_dir {
                dirs.push(text.to_owned());
            }
        }
        Ok(dirs)
    }

    fn walk(
        &self,
        dir: &Path,
        fd: &OwnedFd,
        stack: &mut Vec<PathBuf>,
    ) -> Result<Arc<Vec<Item>>, SnapshotError> {
        if let Some(done) = self.memo.lock().expect("memo lock").get(dir) {
            return Ok(done.clone());
        }
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| SnapshotError::Io { path, source }
        };
        let mut names = Vec::new();
        for name in repo::list(fd).map_err(io_err(dir))? {
            let Some(text) = name.to_str() else {
                return Err(SnapshotError::NotUtf8 {
                    path: dir.join(&name),
                });
            };
            if !is_skipped_name(text) {
                names.push(text.to_owned());
            }
        }
        names.sort();

        let mut items = Vec::new();
        for name in names {
            let os = OsStr::new(&name);
            let path = dir.join(&name);
            let st = repo::stat_at(fd, os).map_err(io_err(&path))?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Symlink => {
                    if is_result_link(&name) {
                        continue;
                    }
                    let text = repo::read_link_at(fd, os).map_err(io_err(&path))?;
                    let (real, target) = self.resolve(dir, &text, &path)?;
                    match target {
                        Target::Dir => {
                            if dir.starts_with(&real) || stack.contains(&real) {
                                return Err(SnapshotError::Loop { link: path });
                            }
                            // A directory every host links to is walked once: the others
                            // need not open it.
                            let done = self.memo.lock().expect("memo lock").get(&real).cloned();
                            let sub = match done {
                                Some(done) => Ok(done),
                                None => {
                                    let sub_fd = repo::open_dir_beneath(self.root_fd()?, &real)
                                        .map_err(io_err(&path))?;
                                    stack.push(real.clone());
                                    let sub = self.walk(&real, &sub_fd, stack);
                                    stack.pop();
                                    sub
                                }
                            };
                            self.push_linked(&mut items, &name, &real, &sub?);
                        }
                        Target::File => {
                            let (parent, file_name) = split_last(&real);
                            let parent_fd = repo::open_dir_beneath(self.root_fd()?, parent)
                                .map_err(io_err(&path))?;
                            let file =
                                repo::open_file_at(&parent_fd, file_name).map_err(io_err(&path))?;
                            items.push(self.file_item(name, &real, file)?);
                        }
                        Target::Other(ft) => return Err(special(path, ft)),
                    }
                }
                FileType::Directory => {
                    let sub_fd = repo::open_dir_at(fd, os).map_err(io_err(&path))?;
                    stack.push(path.clone());
                    let sub = self.walk(&path, &sub_fd, stack);
                    stack.pop();
                    push_dir(&mut items, &name, &sub?);
                }
                FileType::RegularFile => match self.cache.cached(&st) {
                    Some(hashed) => {
                        let found = Found {
                            links: st.st_nlink as u64,
                            size: st.st_size as u64,
                            mode: st.st_mode as u32,
                        };
                        found.check(&path)?;
                        items.push(self.item(name, &path, found, hashed)?);
                    }
                    None => {
                        let file = repo::open_file_at(fd, os).map_err(io_err(&path))?;
                        items.push(self.file_item(name, &path, file)?);
                    }
                },
                ft => return Err(special(path, ft)),
            }
        }
        items.sort_by(|a, b| a.path.cmp(&b.path));
        let items = Arc::new(items);
        self.memo
            .lock()
            .expect("memo lock")
            .insert(dir.to_path_buf(), items.clone());
        Ok(items)
    }

    /// [`push_dir`] for the tree `sub` found at `real` and linked as `name`: every host that
    /// links the same tree under the same name shares its items' paths, made once.
    fn push_linked(&self, items: &mut Vec<Item>, name: &str, real: &Path, sub: &[Item]) {
        let key = (name.to_owned(), real.to_owned());
        let found = self.flat.lock().expect("flat lock").get(&key).cloned();
        let flat = found.unwrap_or_else(|| {
            let mut made = Vec::with_capacity(sub.len() + 1);
            push_dir(&mut made, name, sub);
            let made: Arc<[Item]> = made.into();
            self.flat
                .lock()
                .expect("flat lock")
                .insert(key, made.clone());
            made
        });
        items.extend_from_slice(&flat);
    }

    fn file_item(
        &self,
        name: String,
        real: &Path,
        mut file: fs::File,
    ) -> Result<Item, SnapshotError> {
        let io_err = |source| SnapshotError::Io {
            path: real.to_owned(),
            source,
        };
        // The descriptor's own metadata: what was opened, whatever the name says now.
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(special(
                real.to_owned(),
                FileType::from_raw_mode(meta.mode()),
            ));
        }
        let found = Found {
            links: meta.nlink(),
            size: meta.len(),
            mode: meta.mode(),
        };
        // Refused before it is read.
        found.check(real)?;
        let hashed = self
            .cache
            .hash(&mut file, &meta, self.now)
            .map_err(io_err)?;
        self.item(name, real, found, hashed)
    }

    /// The item of a regular file (checked), from what its stat said and its hash.
    fn item(
        &self,
        name: String,
        real: &Path,
        found: Found,
        hashed: Hashed,
    ) -> Result<Item, SnapshotError> {
        if hashed.private_key {
            self.private_keys
                .lock()
                .expect("keys lock")
                .insert(hashed.sha256);
        }
        Ok(Item {
            path: name.into(),
            kind: ItemKind::File {
                source: Arc::from(self.root.join(real)),
                size: found.size,
                sha256: hashed.sha256,
                executable: found.mode & 0o111 != 0,
            },
        })
    }
}

/// What a regular file's stat says that the scan checks and keeps.
struct Found {
    links: u64,
    size: u64,
    mode: u32,
}

impl Found {
    /// A hard-linked file (its other name may be outside the repo) or one over the
    /// protocol's limit is refused.
    fn check(&self, real: &Path) -> Result<(), SnapshotError> {
        if self.links > 1 {
            return Err(SnapshotError::HardLink {
                path: real.to_owned(),
                links: self.links,
            });
        }
        let limit = crate::protocol::manifest::MAX_OBJECT_BYTES;
        if self.size > limit {
            return Err(SnapshotError::TooLarge {
                path: real.to_owned(),
                size: self.size,
                limit,
            });
        }
        Ok(())
    }
}

/// The parent directory and the name of a resolved file path (never empty).
fn split_last(real: &Path) -> (&Path, &OsStr) {
    (
        real.parent().unwrap_or(Path::new("")),
        real.file_name().unwrap_or_default(),
    )
}

fn push_dir(items: &mut Vec<Item>, name: &str, sub: &[Item]) {
    items.push(Item {
        path: name.into(),
        kind: ItemKind::Dir,
    });
    items.extend(sub.iter().map(|i| Item {
        path: format!("{name}/{}", i.path).into(),
        kind: i.kind.clone(),
    }));
}

fn special(path: PathBuf, ft: FileType) -> SnapshotError {
    let what = match ft {
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::BlockDevice | FileType::CharacterDevice => "device file",
        _ => "special file",
    };
    SnapshotError::Special { path, what }
}

#[cfg(test)]
mod tests;
