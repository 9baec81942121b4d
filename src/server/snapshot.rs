//! Reading a host's tree out of the fleet repo: symlinks resolved (the host never needs the
//! rest of the repo), links that leave the repo, dangle or loop refused by name, `.git`,
//! `result*` links and editor droppings skipped, every file hashed. Directories reached
//! through many links (a `common/` shared by 1,000 hosts) are read once per run, and file
//! hashes are cached across runs by inode, size, mtime and ctime.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::protocol::manifest::Digest;

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
    pub path: String,
    pub kind: ItemKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemKind {
    Dir,
    File {
        /// The real file the content comes from (symlinks resolved).
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

/// Scans directories of one fleet repo. Shared by all hosts of a publish run.
pub struct Scanner {
    root: PathBuf,
    cache: HashCache,
    memo: Mutex<HashMap<PathBuf, Arc<Vec<Item>>>>,
    now: SystemTime,
}

impl Scanner {
    /// `root` is the fleet repo root; it must be canonical (no symlinks in it).
    pub fn new(root: PathBuf, cache: HashCache, now: SystemTime) -> Self {
        Self {
            root,
            cache,
            memo: Mutex::new(HashMap::new()),
            now,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn cache(&self) -> &HashCache {
        &self.cache
    }

    /// A path as the user knows it: relative to the fleet repo root when inside it.
    pub fn display(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.root)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| path.to_path_buf())
    }

    /// All items under `dir` (a directory inside the repo), sorted by path.
    pub fn scan(&self, dir: &Path) -> Result<Arc<Vec<Item>>, SnapshotError> {
        let canonical = fs::canonicalize(dir).map_err(|source| SnapshotError::Io {
            path: self.display(dir),
            source,
        })?;
        let mut stack = vec![canonical.clone()];
        self.walk(&canonical, &mut stack)
    }

    fn walk(&self, dir: &Path, stack: &mut Vec<PathBuf>) -> Result<Arc<Vec<Item>>, SnapshotError> {
        if let Some(done) = self.memo.lock().expect("memo lock").get(dir) {
            return Ok(done.clone());
        }
        let io_err = |path: &Path, source| SnapshotError::Io {
            path: self.display(path),
            source,
        };
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
            let entry = entry.map_err(|e| io_err(dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(SnapshotError::NotUtf8 {
                    path: self.display(&entry.path()),
                });
            };
            if !is_skipped_name(name) {
                names.push(name.to_owned());
            }
        }
        names.sort();

        let mut items = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let meta = fs::symlink_metadata(&path).map_err(|e| io_err(&path, e))?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                if is_result_link(&name) {
                    continue;
                }
                let target = self.resolve_link(&path)?;
                let tmeta = fs::metadata(&target).map_err(|e| io_err(&path, e))?;
                if tmeta.is_dir() {
                    if dir.starts_with(&target) || stack.contains(&target) {
                        return Err(SnapshotError::Loop {
                            link: self.display(&path),
                        });
                    }
                    stack.push(target.clone());
                    let sub = self.walk(&target, stack);
                    stack.pop();
                    push_dir(&mut items, &name, &sub?);
                } else if tmeta.is_file() {
                    items.push(self.file_item(name, &target, &tmeta)?);
                } else {
                    return Err(special(self.display(&path), &tmeta));
                }
            } else if ft.is_dir() {
                stack.push(path.clone());
                let sub = self.walk(&path, stack);
                stack.pop();
                push_dir(&mut items, &name, &sub?);
            } else if ft.is_file() {
                items.push(self.file_item(name, &path, &meta)?);
            } else {
                return Err(special(self.display(&path), &meta));
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

    fn resolve_link(&self, link: &Path) -> Result<PathBuf, SnapshotError> {
        match fs::canonicalize(link) {
            Ok(target) if target.starts_with(&self.root) => Ok(target),
            Ok(target) => Err(SnapshotError::Escape {
                link: self.display(link),
                target,
            }),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(SnapshotError::Loop {
                link: self.display(link),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(SnapshotError::Dangling {
                link: self.display(link),
                target: fs::read_link(link).unwrap_or_default(),
            }),
            Err(source) => Err(SnapshotError::Io {
                path: self.display(link),
                source,
            }),
        }
    }

    fn file_item(
        &self,
        name: String,
        real: &Path,
        meta: &fs::Metadata,
    ) -> Result<Item, SnapshotError> {
        if meta.nlink() > 1 {
            return Err(SnapshotError::HardLink {
                path: self.display(real),
                links: meta.nlink(),
            });
        }
        let limit = crate::protocol::manifest::MAX_OBJECT_BYTES;
        if meta.len() > limit {
            return Err(SnapshotError::TooLarge {
                path: self.display(real),
                size: meta.len(),
                limit,
            });
        }
        let sha256 = self
            .cache
            .hash(real, meta, self.now)
            .map_err(|source| SnapshotError::Io {
                path: self.display(real),
                source,
            })?;
        Ok(Item {
            path: name,
            kind: ItemKind::File {
                source: Arc::from(real),
                size: meta.len(),
                sha256,
                executable: meta.permissions().mode() & 0o111 != 0,
            },
        })
    }
}

fn push_dir(items: &mut Vec<Item>, name: &str, sub: &[Item]) {
    items.push(Item {
        path: name.to_owned(),
        kind: ItemKind::Dir,
    });
    items.extend(sub.iter().map(|i| Item {
        path: format!("{name}/{}", i.path),
        kind: i.kind.clone(),
    }));
}

fn special(path: PathBuf, meta: &fs::Metadata) -> SnapshotError {
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    let what = if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "device file"
    } else {
        "special file"
    };
    SnapshotError::Special { path, what }
}

/// sha256 of a file's content, streamed.
pub fn hash_file(path: &Path) -> io::Result<Digest> {
    let mut f = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest::from_bytes(hasher.finalize().into()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CacheRecord {
    #[serde(flatten)]
    stamp: Stamp,
    sha256: Digest,
}

/// File hashes remembered across runs, keyed by (device, inode) and trusted only while
/// size, mtime and ctime are unchanged. A file modified in the last two seconds is never
/// cached: its mtime could still change without the timestamp moving (racy timestamps).
#[derive(Default)]
pub struct HashCache {
    map: Mutex<HashMap<(u64, u64), (Stamp, Digest)>>,
    seen: Mutex<std::collections::HashSet<(u64, u64)>>,
    dirty: AtomicBool,
}

const RACY_WINDOW: Duration = Duration::from_secs(2);

impl HashCache {
    /// Loads the cache; a missing or unreadable cache is an empty one (it is only a cache).
    pub fn load(path: &Path) -> Self {
        let records: Vec<CacheRecord> = fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let map = records
            .into_iter()
            .map(|r| ((r.stamp.dev, r.stamp.ino), (r.stamp, r.sha256)))
            .collect();
        Self {
            map: Mutex::new(map),
            seen: Mutex::default(),
            dirty: AtomicBool::new(false),
        }
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Relaxed)
    }

    /// The cache's bytes, to be written atomically by the caller.
    pub fn to_bytes(&self) -> Vec<u8> {
        let map = self.map.lock().expect("cache lock");
        let mut records: Vec<CacheRecord> = map
            .values()
            .map(|(stamp, sha256)| CacheRecord {
                stamp: *stamp,
                sha256: *sha256,
            })
            .collect();
        records.sort_by_key(|r| (r.stamp.dev, r.stamp.ino));
        serde_json::to_vec(&records).expect("cache serialises")
    }

    /// Drops records for inodes not looked up in this run, so the cache does not grow
    /// forever as editors replace files.
    pub fn prune_unseen(&self) {
        let seen = self.seen.lock().expect("cache lock");
        let mut map = self.map.lock().expect("cache lock");
        let before = map.len();
        map.retain(|k, _| seen.contains(k));
        if map.len() != before {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    pub fn hash(&self, path: &Path, meta: &fs::Metadata, now: SystemTime) -> io::Result<Digest> {
        let stamp = Stamp::of(meta);
        let key = (stamp.dev, stamp.ino);
        self.seen.lock().expect("cache lock").insert(key);
        if let Some((cached, digest)) = self.map.lock().expect("cache lock").get(&key) {
            if *cached == stamp {
                return Ok(*digest);
            }
        }
        let digest = hash_file(path)?;
        // Re-stat: a file written while we read it must not be cached under the old stamp.
        let after = Stamp::of(&fs::metadata(path)?);
        let mtime = UNIX_EPOCH + Duration::from_nanos(stamp.mtime_ns.max(0) as u64);
        let settled = now.duration_since(mtime).is_ok_and(|age| age > RACY_WINDOW);
        if after == stamp && settled {
            self.map
                .lock()
                .expect("cache lock")
                .insert(key, (stamp, digest));
            self.dirty.store(true, Ordering::Relaxed);
        }
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scanner(root: &Path) -> Scanner {
        Scanner::new(
            fs::canonicalize(root).unwrap(),
            HashCache::default(),
            SystemTime::now(),
        )
    }

    fn paths(items: &[Item]) -> Vec<&str> {
        items.iter().map(|i| i.path.as_str()).collect()
    }

    #[test]
    fn resolves_links_and_skips_droppings() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("common/sub")).unwrap();
        fs::write(r.join("common/a.nix"), "a").unwrap();
        fs::write(r.join("common/sub/b.nix"), "b").unwrap();
        fs::create_dir_all(r.join("hosts/h1/.git")).unwrap();
        fs::write(r.join("hosts/h1/configuration.nix"), "c").unwrap();
        fs::write(r.join("hosts/h1/configuration.nix~"), "old").unwrap();
        fs::write(r.join("hosts/h1/.configuration.nix.swp"), "swap").unwrap();
        symlink("../../common", r.join("hosts/h1/common")).unwrap();
        symlink("../../common/a.nix", r.join("hosts/h1/a.nix")).unwrap();
        symlink("/nix/store/nothing", r.join("hosts/h1/result")).unwrap();
        let s = scanner(r);
        let items = s.scan(&r.join("hosts/h1")).unwrap();
        assert_eq!(
            paths(&items),
            [
                "a.nix",
                "common",
                "common/a.nix",
                "common/sub",
                "common/sub/b.nix",
                "configuration.nix"
            ]
        );
        let ItemKind::File { sha256, source, .. } = &items[0].kind else {
            panic!("a.nix is a file")
        };
        assert_eq!(*sha256, Digest::of(b"a"));
        assert!(source.ends_with("common/a.nix"));
    }

    #[test]
    fn bad_links_are_named() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("repo");
        fs::create_dir_all(r.join("h")).unwrap();
        fs::write(t.path().join("outside"), "x").unwrap();

        symlink("../../outside", r.join("h/esc")).unwrap();
        let err = scanner(&r).scan(&r.join("h")).unwrap_err();
        assert!(matches!(err, SnapshotError::Escape { .. }), "{err}");
        assert!(err.to_string().contains("h/esc"), "{err}");
        fs::remove_file(r.join("h/esc")).unwrap();

        symlink("nothing-here", r.join("h/dangling")).unwrap();
        let err = scanner(&r).scan(&r.join("h")).unwrap_err();
        assert!(matches!(err, SnapshotError::Dangling { .. }), "{err}");
        assert!(err.to_string().contains("h/dangling"), "{err}");
        fs::remove_file(r.join("h/dangling")).unwrap();

        symlink("self", r.join("h/self")).unwrap();
        let err = scanner(&r).scan(&r.join("h")).unwrap_err();
        assert!(matches!(err, SnapshotError::Loop { .. }), "{err}");
        fs::remove_file(r.join("h/self")).unwrap();

        fs::create_dir_all(r.join("h/d")).unwrap();
        symlink("..", r.join("h/d/up")).unwrap();
        let err = scanner(&r).scan(&r.join("h")).unwrap_err();
        assert!(matches!(err, SnapshotError::Loop { .. }), "{err}");
        assert!(err.to_string().contains("h/d/up"), "{err}");
    }

    #[test]
    fn fifo_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let fifo = r.join("pipe");
        unix::unistd::mkfifo(&fifo, unix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = scanner(r).scan(r).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
    }

    #[test]
    fn cache_trusts_only_unchanged_settled_files() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, "one").unwrap();
        let cache = HashCache::default();
        let meta = fs::metadata(&f).unwrap();
        // Just written: hashed but not cached.
        cache.hash(&f, &meta, SystemTime::now()).unwrap();
        assert!(!cache.is_dirty());
        let later = SystemTime::now() + Duration::from_secs(10);
        assert_eq!(cache.hash(&f, &meta, later).unwrap(), Digest::of(b"one"));
        assert!(cache.is_dirty());
        // Same size, new content: the stamp differs, so it is re-hashed.
        fs::write(&f, "two").unwrap();
        let meta = fs::metadata(&f).unwrap();
        assert_eq!(cache.hash(&f, &meta, later).unwrap(), Digest::of(b"two"));
        let back = t.path().join("cache.json");
        fs::write(&back, cache.to_bytes()).unwrap();
        let loaded = HashCache::load(&back);
        assert_eq!(loaded.map.lock().unwrap().len(), 1);
    }
}
