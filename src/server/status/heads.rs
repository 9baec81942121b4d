//! What `bento status` needs of each live manifest (its format, `created` and `system`),
//! remembered across runs in the publisher's state (`.bento/status-heads`). A manifest is
//! named by its digest and never changes, so a remembered head is never stale: a host whose
//! `current` names a digest the file lacks (a publish or rollback since the last status) is
//! read as before. A run that had to read a manifest writes the heads of the live
//! manifests, one per host, so the file does not grow with history; a run that read none
//! leaves it as it is (a hit costs no lock and no write). Without it, each
//! status run reads one manifest per host: a tenth of a 10,000-host run's system calls.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::protocol::manifest::Digest;
use crate::protocol::StorePath;

/// The file, in the publisher's state directory.
pub const FILE: &str = "status-heads";
/// The file's first bytes; a file without them (torn, foreign) is no cache at all.
const MAGIC: &[u8] = b"bento status heads 1\n";
/// The length written for a manifest without `system`.
const NO_SYSTEM: u16 = u16::MAX;

/// The fields of a manifest's head that status reads. Not `deny_unknown_fields` and without
/// `config`, so a host with thousands of files costs a skim, not a parse.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Head {
    pub format: u32,
    pub created: String,
    #[serde(default)]
    pub system: Option<StorePath>,
}

/// The heads remembered from the last run, and those this run had to read.
#[derive(Debug, Default)]
pub struct Heads {
    path: Option<PathBuf>,
    known: HashMap<Digest, Head>,
    read: Mutex<Vec<(Digest, Head)>>,
}

impl Heads {
    /// The heads kept at `path`; none when it is missing or unreadable.
    pub fn load(path: PathBuf) -> Self {
        let known = std::fs::read(&path)
            .ok()
            .and_then(|b| parse(&b))
            .unwrap_or_default();
        Self {
            path: Some(path),
            known,
            ..Self::default()
        }
    }

    /// The head of manifest `digest`: remembered, else `read` (and then remembered).
    pub fn get<E>(
        &self,
        digest: &Digest,
        read: impl FnOnce() -> Result<Head, E>,
    ) -> Result<Head, E> {
        if let Some(h) = self.known.get(digest) {
            return Ok(h.clone());
        }
        let head = read()?;
        self.read
            .lock()
            .expect("heads lock")
            .push((*digest, head.clone()));
        Ok(head)
    }

    /// Keeps the heads of the `live` manifests, when this run had to read any of them. A
    /// publisher state it may not write (status run by another user) only means no cache.
    pub fn save(&self, live: impl Iterator<Item = Digest>) {
        let Some(path) = &self.path else { return };
        let read = std::mem::take(&mut *self.read.lock().expect("heads lock"));
        if read.is_empty() || !path.parent().is_some_and(Path::is_dir) {
            return;
        }
        let read: HashMap<Digest, Head> = read.into_iter().collect();
        let kept: HashMap<Digest, &Head> = live
            .filter_map(|d| Some((d, read.get(&d).or_else(|| self.known.get(&d))?)))
            .collect();
        if let Err(e) = crate::sys::atomic::write_file(path, &to_bytes(&kept), 0o600) {
            tracing::debug!("{}: not written: {e}", path.display());
        }
    }
}

fn to_bytes(heads: &HashMap<Digest, &Head>) -> Vec<u8> {
    let mut sorted: Vec<(&Digest, &&Head)> = heads.iter().collect();
    sorted.sort_by_key(|(d, _)| **d);
    let mut out = MAGIC.to_vec();
    for (digest, head) in sorted {
        // A `created` or store path this long is no manifest bento wrote: not remembered.
        let system = head.system.as_ref().map(StorePath::as_str);
        if head.created.len() >= usize::from(NO_SYSTEM)
            || system.is_some_and(|s| s.len() >= usize::from(NO_SYSTEM))
        {
            continue;
        }
        out.extend_from_slice(digest.as_bytes());
        out.extend_from_slice(&head.format.to_le_bytes());
        out.extend_from_slice(&(head.created.len() as u16).to_le_bytes());
        out.extend_from_slice(head.created.as_bytes());
        match system {
            Some(s) => {
                out.extend_from_slice(&(s.len() as u16).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            None => out.extend_from_slice(&NO_SYSTEM.to_le_bytes()),
        }
    }
    out
}

fn parse(bytes: &[u8]) -> Option<HashMap<Digest, Head>> {
    let mut r = crate::sys::binary::Reader::after(bytes, MAGIC)?;
    let mut out = HashMap::new();
    // A torn last record fails a read: nothing is trusted then.
    while !r.is_empty() {
        let digest = Digest::from_bytes(r.take()?);
        let format = r.u32()?;
        let len = r.u16()?;
        let created = String::from_utf8(r.bytes(usize::from(len))?.to_vec()).ok()?;
        let system = match r.u16()? {
            NO_SYSTEM => None,
            len => {
                Some(StorePath::new(std::str::from_utf8(r.bytes(usize::from(len))?).ok()?).ok()?)
            }
        };
        out.insert(
            digest,
            Head {
                format,
                created,
                system,
            },
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(n: u8, system: bool) -> (Digest, Head) {
        (
            Digest::of(&[n]),
            Head {
                format: 2,
                created: format!("2026-12-06T12:00:0{n}Z"),
                system: system.then(|| {
                    StorePath::new("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-a")
                        .unwrap()
                }),
            },
        )
    }

    #[test]
    fn live_heads_are_kept_read_back_and_a_torn_or_foreign_file_is_no_cache() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("status-heads");
        let first = Heads::load(path.clone());
        let (a, b) = (head(1, true), head(2, false));
        let mut reads = 0;
        for (d, h) in [&a, &b] {
            let got = first
                .get(d, || {
                    reads += 1;
                    Ok::<_, ()>(h.clone())
                })
                .unwrap();
            assert_eq!(&got, h);
        }
        assert_eq!(reads, 2);
        first.save([a.0, b.0].into_iter());

        // The next run finds both without reading a manifest, and so writes nothing.
        let second = Heads::load(path.clone());
        for (d, h) in [&a, &b] {
            assert_eq!(&second.get(d, || Err(())).unwrap(), h, "remembered");
        }
        let untouched = std::time::SystemTime::UNIX_EPOCH;
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(untouched).unwrap();
        second.save([a.0, b.0].into_iter());
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert_eq!(mtime, untouched, "nothing read, nothing written");
        // A host moved to a new version: its head is read, and only the live heads are kept.
        let third = Heads::load(path.clone());
        let c = head(3, false);
        third.get(&a.0, || Err(())).unwrap();
        third.get(&c.0, || Ok::<_, ()>(c.1.clone())).unwrap();
        third.save([a.0, c.0].into_iter());
        let kept = Heads::load(path.clone()).known;
        assert_eq!(
            kept.keys().collect::<std::collections::BTreeSet<_>>(),
            [&a.0, &c.0].into()
        );

        let bytes = std::fs::read(&path).unwrap();
        for bad in [&bytes[..bytes.len() - 1], b"[]".as_slice()] {
            std::fs::write(&path, bad).unwrap();
            assert!(Heads::load(path.clone()).known.is_empty());
        }
    }
}
