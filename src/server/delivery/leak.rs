//! Defence in depth behind restricted evaluation (`Nix::restricted`): before a host is
//! published or exported, the store paths its evaluation and build made — the derivation's
//! closure (every `.drv` with its environment, every source it added) and, for a server
//! build, the system's closure — are searched for the fleet's secret keys (`[server]
//! signing_key`, `[server] cache_key`). A host whose paths hold one is refused, and those
//! paths are deleted from the store where nothing else keeps them. Invariant: no path
//! holding a fleet key is named in a manifest or exported into a host's `cache/`.
//!
//! Store paths never change, so a path once found clean is remembered (for the same keys)
//! in `<chroot>/.bento/leak-scan.json`: a NixOS closure of thousands of paths is searched
//! once, then only what a publish adds.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read as _};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64ct::Encoding as _;
use memchr::memmem;
use serde::{Deserialize, Serialize};

use crate::nix::{Nix, NixError, StorePath};
use crate::protocol::layout::Chroot;
use crate::protocol::manifest::Digest;
use crate::sys::atomic;

/// The remembered clean paths, in `<chroot>/.bento/`.
const SCAN_CACHE: &str = "leak-scan.json";
/// Lines of a key file shorter than this are not searched for alone (a PEM header, `=`).
const MIN_LINE: usize = 20;
/// Bytes of one file searched; a larger file is searched up to here (a key copied past
/// 256 MiB of padding is not what this guards against: restricted evaluation is).
const MAX_FILE: u64 = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LeakError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Nix(#[from] NixError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LeakError + '_ {
    move |source| LeakError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What to look for: each key file's whole text, each of its longer lines (a `.drv`
/// escapes newlines, so a multi-line key shows there line by line), and for a Nix key its
/// base64 part and raw bytes.
#[derive(Debug, Clone, Default)]
pub struct Needles {
    needles: Vec<Vec<u8>>,
    /// Which keys: remembered clean paths are only valid for the same needles.
    digest: String,
}

impl Needles {
    /// From the key files; a file that cannot be read is an error (publish signs with it
    /// or exports with it anyway, so it fails there too).
    pub fn from_files(paths: &[&Path]) -> Result<Self, LeakError> {
        let mut set = BTreeSet::new();
        for path in paths {
            let bytes = fs::read(path).map_err(io_err(path))?;
            let text = String::from_utf8_lossy(&bytes);
            let whole = text.trim();
            if whole.len() >= MIN_LINE {
                set.insert(whole.as_bytes().to_vec());
            }
            // PEM armour lines are in every key of the kind (and in documentation): not
            // this key's.
            for line in text
                .lines()
                .map(str::trim)
                .filter(|l| l.len() >= MIN_LINE && !l.starts_with("-----"))
            {
                set.insert(line.as_bytes().to_vec());
            }
            // `name:base64`: the base64 alone and the 64 bytes it encodes.
            if let Some((_, b64)) = whole.split_once(':') {
                if let Ok(raw) = base64ct::Base64::decode_vec(b64) {
                    set.insert(b64.as_bytes().to_vec());
                    set.insert(raw);
                }
            }
        }
        let needles: Vec<Vec<u8>> = set.into_iter().collect();
        let digest = Digest::of(&needles.concat()).to_hex();
        Ok(Self { needles, digest })
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    fn found_in(&self, bytes: &[u8]) -> bool {
        self.needles
            .iter()
            .any(|n| memmem::find(bytes, n).is_some())
    }

    /// Whether anything under `path` (a file, or a directory walked without following
    /// links; a link's target text counts) holds a needle.
    fn found_under(&self, path: &Path) -> Result<bool, LeakError> {
        let meta = fs::symlink_metadata(path).map_err(io_err(path))?;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(path).map_err(io_err(path))?;
            return Ok(self.found_in(target.as_os_str().as_encoded_bytes()));
        }
        if meta.is_dir() {
            for entry in fs::read_dir(path).map_err(io_err(path))? {
                let entry = entry.map_err(io_err(path))?;
                if self.found_under(&entry.path())? {
                    return Ok(true);
                }
            }
            return Ok(false);
        }
        if !meta.is_file() || meta.size() == 0 {
            return Ok(false);
        }
        let mut bytes = Vec::with_capacity(meta.size().min(MAX_FILE) as usize);
        fs::File::open(path)
            .map_err(io_err(path))?
            .take(MAX_FILE)
            .read_to_end(&mut bytes)
            .map_err(io_err(path))?;
        Ok(self.found_in(&bytes))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    needles: String,
    clean: BTreeSet<String>,
}

/// The search of one publish run: the needles and the paths known clean.
#[derive(Debug, Default)]
pub struct Guard {
    needles: Needles,
    clean: Mutex<BTreeSet<String>>,
}

impl Guard {
    pub fn new(needles: Needles) -> Self {
        Self {
            needles,
            clean: Mutex::new(BTreeSet::new()),
        }
    }

    /// Loads the clean paths remembered for these needles.
    pub fn load(&self, chroot: &Chroot) {
        let path = chroot.state_dir().join(SCAN_CACHE);
        let Ok(bytes) = fs::read(&path) else { return };
        match serde_json::from_slice::<CacheFile>(&bytes) {
            Ok(c) if c.needles == self.needles.digest => {
                if let Ok(mut clean) = self.clean.lock() {
                    clean.extend(c.clean);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("{}: {e}; searching every path again", path.display()),
        }
    }

    /// Remembers the clean paths (a failure only costs a search next time).
    pub fn save(&self, chroot: &Chroot) {
        if self.needles.is_empty() || !chroot.state_dir().is_dir() {
            return;
        }
        let path = chroot.state_dir().join(SCAN_CACHE);
        let Ok(clean) = self.clean.lock() else { return };
        // Paths Nix has collected since are dropped, so the file tracks the store instead of
        // growing with every system ever published.
        let file = CacheFile {
            needles: self.needles.digest.clone(),
            clean: clean
                .iter()
                .filter(|p| Path::new(p.as_str()).exists())
                .cloned()
                .collect(),
        };
        let bytes = serde_json::to_vec(&file).expect("serialises");
        if let Err(e) = atomic::write_file(&path, &bytes, 0o600) {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }

    /// The paths of `roots`' closures that hold a key (empty when none does).
    pub fn leaking(&self, nix: &Nix, roots: &[&StorePath]) -> Result<Vec<String>, LeakError> {
        if self.needles.is_empty() || roots.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["--query", "--requisites"];
        args.extend(roots.iter().map(|r| r.as_str()));
        let out = nix.run("nix-store", &args)?;
        let mut found = Vec::new();
        for path in out.stdout_text().lines().map(str::trim) {
            if path.is_empty() || self.is_clean(path) {
                continue;
            }
            if self.needles.found_under(Path::new(path))? {
                found.push(path.to_owned());
            } else if let Ok(mut clean) = self.clean.lock() {
                clean.insert(path.to_owned());
            }
        }
        Ok(found)
    }

    fn is_clean(&self, path: &str) -> bool {
        self.clean.lock().is_ok_and(|c| c.contains(path))
    }
}

/// Deletes `paths` and whatever refers to them from the store (the world-readable store is
/// where they leak), unless something keeps them alive; says what it could not delete.
pub fn purge(nix: &Nix, paths: &[String]) {
    if paths.is_empty() {
        return;
    }
    let mut args = vec!["--query", "--referrers-closure"];
    args.extend(paths.iter().map(String::as_str));
    let all: Vec<String> = match nix.run("nix-store", &args) {
        Ok(out) => out.stdout_text().lines().map(str::to_owned).collect(),
        Err(_) => paths.to_vec(),
    };
    let mut args = vec!["--delete"];
    args.extend(all.iter().map(String::as_str));
    if let Err(e) = nix.run("nix-store", &args) {
        tracing::warn!(
            "cannot delete the store paths holding a fleet key ({}): {e}",
            paths.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_whole_by_line_and_decoded() {
        let tmp = tempfile::tempdir().unwrap();
        let ssh = tmp.path().join("signing");
        let line = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW";
        fs::write(
            &ssh,
            format!(
                "-----BEGIN OPENSSH PRIVATE KEY-----\n{line}\n-----END OPENSSH PRIVATE KEY-----\n"
            ),
        )
        .unwrap();
        let raw = [9u8; 64];
        let b64 = base64ct::Base64::encode_string(&raw);
        let cache = tmp.path().join("cache");
        fs::write(&cache, format!("bento-1:{b64}\n")).unwrap();
        let n = Needles::from_files(&[&ssh, &cache]).unwrap();
        // A .drv escapes the newlines of a whole key: each line is still found.
        let drv = format!("Derive([],[],[],\"/bin/sh\",[],[(\"payload\",\"-----BEGIN OPENSSH PRIVATE KEY-----\\n{line}\\n\")])");
        assert!(n.found_in(drv.as_bytes()));
        assert!(n.found_in(format!("x{b64}y").as_bytes()));
        let mut blob = vec![0u8; 100];
        blob.extend_from_slice(&raw);
        assert!(n.found_in(&blob));
        assert!(!n.found_in(b"-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        assert!(!n.found_in(b"bento-1:"));

        let dir = tmp.path().join("out");
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::write(dir.join("etc/motd"), "hello").unwrap();
        assert!(!n.found_under(&dir).unwrap());
        fs::write(dir.join("etc/payload"), format!("{b64}\n")).unwrap();
        assert!(n.found_under(&dir).unwrap());

        // Other keys, other digest: remembered clean paths do not carry over.
        let n2 = Needles::from_files(&[&ssh]).unwrap();
        assert_ne!(n.digest, n2.digest);
    }

    #[test]
    fn remembered_clean_paths_forget_what_left_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("key");
        fs::write(&key, "bento-1:c2VjcmV0LWtleS1ieXRlcy1mb3ItdGVzdHM=\n").unwrap();
        let chroot = Chroot::new(tmp.path().join("chroot"));
        fs::create_dir_all(chroot.state_dir()).unwrap();
        let kept = tmp.path().join("kept-path");
        fs::write(&kept, "x").unwrap();
        let collected = tmp.path().join("collected-path");

        let guard = Guard::new(Needles::from_files(&[&key]).unwrap());
        for p in [&kept, &collected] {
            guard.clean.lock().unwrap().insert(p.display().to_string());
        }
        guard.save(&chroot);

        let again = Guard::new(Needles::from_files(&[&key]).unwrap());
        again.load(&chroot);
        assert!(again.is_clean(&kept.display().to_string()));
        assert!(!again.is_clean(&collected.display().to_string()));
    }
}
