//! File hashes remembered across publishes, by inode, size, mtime and ctime, with whether
//! the content holds a private key (found while hashing). Files are hashed through the
//! descriptor the scanner opened, never by path, so what is hashed is what was checked.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use super::keys::KeySniffer;
use crate::protocol::manifest::Digest;
use crate::sys::stamp::{self, Stamp};

/// What hashing a file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hashed {
    pub sha256: Digest,
    /// The content holds an OpenSSH/PEM private key or an age secret key.
    pub private_key: bool,
}

/// sha256 of everything `reader` gives, streamed, and whether it held a private key.
pub fn hash_reader(reader: &mut impl Read) -> io::Result<Hashed> {
    let mut hasher = Sha256::new();
    let mut keys = KeySniffer::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        keys.update(&buf[..n]);
    }
    Ok(Hashed {
        sha256: Digest::from_bytes(hasher.finalize().into()),
        private_key: keys.found(),
    })
}

/// sha256 of a file's content, streamed.
pub fn hash_file(path: &Path) -> io::Result<Digest> {
    Ok(hash_reader(&mut fs::File::open(path)?)?.sha256)
}

/// The cache file's first bytes. The file is binary (a fleet of 1,000 hosts has some 30,000
/// records: JSON took a publish 70 ms to parse); a file without them (the JSON of older
/// bentos, a torn write) is an empty cache: every file is hashed once more.
const MAGIC: &[u8] = b"bento hash cache 1\n";
/// One record: device, inode, size, mtime and ctime (ns) as little-endian 64-bit numbers,
/// the sha256, then 1 when the content holds a private key, else 0.
const RECORD: usize = stamp::BYTES + 32 + 1;

/// The records of a whole cache file; `None` for a torn or foreign one.
fn records(bytes: &[u8]) -> Option<HashMap<(u64, u64), (Stamp, Hashed)>> {
    let mut r = crate::sys::binary::Reader::after(bytes, MAGIC)?;
    let mut map = HashMap::new();
    while !r.is_empty() {
        let stamp = Stamp::read(&mut r)?;
        let hashed = Hashed {
            sha256: Digest::from_bytes(r.take()?),
            private_key: r.take::<1>()?[0] != 0,
        };
        map.insert((stamp.dev, stamp.ino), (stamp, hashed));
    }
    Some(map)
}

/// File hashes remembered across runs, keyed by (device, inode) and trusted only while
/// size, mtime and ctime are unchanged. A file changed in the last two seconds is never
/// cached: it could still change without its times moving (racy timestamps, `sys::stamp`).
#[derive(Default)]
pub struct HashCache {
    map: Mutex<HashMap<(u64, u64), (Stamp, Hashed)>>,
    seen: Mutex<HashSet<(u64, u64)>>,
    dirty: AtomicBool,
}

impl HashCache {
    /// Loads the cache; a missing or unreadable cache is an empty one (it is only a cache).
    pub fn load(path: &Path) -> Self {
        let bytes = fs::read(path).unwrap_or_default();
        let map = records(&bytes).unwrap_or_default();
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
        let mut records: Vec<&(Stamp, Hashed)> = map.values().collect();
        records.sort_by_key(|(stamp, _)| (stamp.dev, stamp.ino));
        let mut out = Vec::with_capacity(MAGIC.len() + records.len() * RECORD);
        out.extend_from_slice(MAGIC);
        for (stamp, hashed) in records {
            stamp.write(&mut out);
            out.extend_from_slice(hashed.sha256.as_bytes());
            out.push(u8::from(hashed.private_key));
        }
        out
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

    /// The remembered hash of the file an `lstat` of its name found, if the file is
    /// unchanged since it was hashed: the scan opens a file only when it must hash it
    /// (an unchanged fleet of 1,000 hosts × 30 files of their own: 90,000 fewer calls).
    pub fn cached(&self, st: &rustix::fs::Stat) -> Option<Hashed> {
        let stamp = Stamp::of_stat(st);
        let key = (stamp.dev, stamp.ino);
        let hit = self
            .map
            .lock()
            .expect("cache lock")
            .get(&key)
            .filter(|(cached, _)| *cached == stamp)
            .map(|(_, hashed)| *hashed)?;
        self.seen.lock().expect("cache lock").insert(key);
        Some(hit)
    }

    /// Hashes the open `file` (whose `fstat` is `meta`), or remembers its hash.
    pub fn hash(
        &self,
        file: &mut fs::File,
        meta: &fs::Metadata,
        now: SystemTime,
    ) -> io::Result<Hashed> {
        let stamp = Stamp::of(meta);
        let key = (stamp.dev, stamp.ino);
        self.seen.lock().expect("cache lock").insert(key);
        if let Some((cached, hashed)) = self.map.lock().expect("cache lock").get(&key) {
            if *cached == stamp {
                return Ok(*hashed);
            }
        }
        let hashed = hash_reader(file)?;
        // Re-stat: a file written while we read it must not be cached under the old stamp.
        let after = Stamp::of(&file.metadata()?);
        if after == stamp && stamp.settled(now) {
            self.map
                .lock()
                .expect("cache lock")
                .insert(key, (stamp, hashed));
            self.dirty.store(true, Ordering::Relaxed);
        }
        Ok(hashed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn hash(cache: &HashCache, f: &Path, now: SystemTime) -> Hashed {
        let mut file = fs::File::open(f).unwrap();
        let meta = file.metadata().unwrap();
        cache.hash(&mut file, &meta, now).unwrap()
    }

    #[test]
    fn cache_trusts_only_unchanged_settled_files() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, "one").unwrap();
        let cache = HashCache::default();
        // Just written: hashed but not cached.
        hash(&cache, &f, SystemTime::now());
        assert!(!cache.is_dirty());
        let later = SystemTime::now() + Duration::from_secs(10);
        assert_eq!(hash(&cache, &f, later).sha256, Digest::of(b"one"));
        assert!(cache.is_dirty());
        // Same size, new content: the stamp differs, so it is re-hashed.
        fs::write(&f, "two").unwrap();
        assert_eq!(hash(&cache, &f, later).sha256, Digest::of(b"two"));
        let back = t.path().join("cache");
        fs::write(&back, cache.to_bytes()).unwrap();
        let loaded = HashCache::load(&back);
        assert_eq!(loaded.map.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_cached_key_stays_found_and_a_foreign_or_torn_file_is_an_empty_cache() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("k");
        fs::write(&f, "-----BEGIN OPENSSH PRIVATE KEY-----\n").unwrap();
        let cache = HashCache::default();
        let later = SystemTime::now() + Duration::from_secs(10);
        assert!(hash(&cache, &f, later).private_key);
        let back = t.path().join("cache");
        let bytes = cache.to_bytes();
        fs::write(&back, &bytes).unwrap();
        let loaded = HashCache::load(&back);
        assert_eq!(
            loaded.map.lock().unwrap().values().next().unwrap().1,
            Hashed {
                sha256: Digest::of(b"-----BEGIN OPENSSH PRIVATE KEY-----\n"),
                private_key: true
            }
        );
        assert!(hash(&loaded, &f, later).private_key);
        assert!(
            !loaded.is_dirty(),
            "found in the loaded cache, not hashed again"
        );
        // A torn write, another format (the JSON of older bentos): nothing trusted.
        for bad in [&bytes[..bytes.len() - 1], b"[{\"dev\":1}]".as_slice(), b""] {
            fs::write(&back, bad).unwrap();
            assert!(HashCache::load(&back).map.lock().unwrap().is_empty());
        }
    }
}
