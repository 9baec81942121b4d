//! Fetching a version from any [`Source`]: the bounded reads of `current`, the manifest and
//! its signature, and the object downloads into the local cache.
//!
//! Invariants, kept here once for every backend: a file over its protocol limit is refused
//! before it is downloaded when the source can tell its size (and still refused if it grows
//! meanwhile); an object lands in `objects/<digest>` only after its bytes hash to the digest;
//! an interrupted download stays in `objects/.partial-<digest>` and resumes where it stopped.

use std::io::Read;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::source::{Item, ObjectPart, RemoteError, Source};
use crate::protocol::manifest::{Digest, MAX_MANIFEST_BYTES};
use crate::protocol::signing::MAX_SIGNATURE_BYTES;

/// `current` holds one digest and a newline; anything much longer is not one.
pub const MAX_CURRENT_BYTES: u64 = 4096;

/// The text of `current`, `None` when nothing is published yet.
pub fn current(src: &mut dyn Source) -> Result<Option<String>, RemoteError> {
    Ok(src
        .read(Item::Current, MAX_CURRENT_BYTES)?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// The manifest's bytes (unverified: the caller checks them against the digest).
pub fn manifest(src: &mut dyn Source, digest: Digest) -> Result<Vec<u8>, RemoteError> {
    bounded(src, Item::Manifest(digest), MAX_MANIFEST_BYTES)?.ok_or_else(|| RemoteError::NotFound {
        path: Item::Manifest(digest).path(),
    })
}

/// The manifest's signature, `None` when it has none.
pub fn signature(src: &mut dyn Source, digest: Digest) -> Result<Option<Vec<u8>>, RemoteError> {
    bounded(src, Item::Signature(digest), MAX_SIGNATURE_BYTES)
}

/// The version's freshness stamp, `None` when it has none. One request, no size first:
/// it is read on polls that change nothing, where every round trip counts.
pub fn fresh(src: &mut dyn Source, digest: Digest) -> Result<Option<Vec<u8>>, RemoteError> {
    src.read(
        Item::Fresh(digest),
        crate::protocol::freshness::MAX_STAMP_BYTES,
    )
}

/// Asks for the size first, so an oversized file costs a stat, not its download.
fn bounded(src: &mut dyn Source, item: Item, limit: u64) -> Result<Option<Vec<u8>>, RemoteError> {
    match src.size(item)? {
        None => return Ok(None),
        Some(size) if size > limit => {
            return Err(RemoteError::TooLarge {
                path: item.path(),
                limit,
            })
        }
        Some(_) => {}
    }
    src.read(item, limit)
}

/// Name of the partial download of an object.
pub fn partial_name(digest: &Digest) -> String {
    format!(".partial-{digest}")
}

/// Downloads `objects` (digest, promised size) into `dir/<digest>`, resuming partial files
/// left by an interrupted run and verifying every hash. Returns the bytes fetched.
pub fn objects(
    src: &mut dyn Source,
    objects: &[(Digest, u64)],
    dir: &Path,
) -> Result<u64, RemoteError> {
    let mut parts = Vec::new();
    for (digest, size) in objects {
        let dest = dir.join(partial_name(digest));
        let have = match std::fs::metadata(&dest) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(RemoteError::Local { path: dest, source }),
        };
        // One byte past the promised size is asked for, so an oversized object fails its
        // hash instead of being cut to size. A complete partial needs no request at all.
        if have < *size || *size == 0 {
            parts.push(ObjectPart {
                item: Item::Object(*digest),
                from: have,
                max: (size + 1).saturating_sub(have),
                dest,
            });
        }
    }
    let fetched = src.read_objects(&parts)?;
    for (digest, _) in objects {
        finish_object(dir, digest)?;
    }
    Ok(fetched)
}

/// Moves a fully downloaded partial file into place after checking its hash; a bad one is
/// deleted so the next run downloads it afresh.
fn finish_object(dir: &Path, digest: &Digest) -> Result<(), RemoteError> {
    let partial = dir.join(partial_name(digest));
    let local = |path: &Path| {
        let path = path.to_owned();
        move |source| RemoteError::Local { path, source }
    };
    let actual = hash_file(&partial).map_err(local(&partial))?;
    if actual != *digest {
        let _ = std::fs::remove_file(&partial);
        return Err(RemoteError::BadObject {
            digest: *digest,
            actual,
        });
    }
    let dest = dir.join(digest.to_hex());
    std::fs::rename(&partial, &dest).map_err(local(&dest))
}

fn hash_file(path: &Path) -> std::io::Result<Digest> {
    let mut f = std::fs::File::open(path)?;
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

#[cfg(test)]
mod tests {
    use super::super::source::DirConnection;
    use super::*;
    use crate::protocol::layout;

    /// A source that counts what it was asked to read.
    struct Counting<S> {
        inner: S,
        reads: Vec<Item>,
    }

    impl<S: Source> Source for Counting<S> {
        fn size(&mut self, item: Item) -> Result<Option<u64>, RemoteError> {
            self.inner.size(item)
        }
        fn read(&mut self, item: Item, limit: u64) -> Result<Option<Vec<u8>>, RemoteError> {
            self.reads.push(item);
            self.inner.read(item, limit)
        }
        fn read_objects(&mut self, parts: &[ObjectPart]) -> Result<u64, RemoteError> {
            self.reads.extend(parts.iter().map(|p| p.item));
            self.inner.read_objects(parts)
        }
    }

    fn chroot() -> (tempfile::TempDir, Counting<DirConnection>) {
        let t = tempfile::tempdir().unwrap();
        for d in [layout::MANIFESTS, layout::OBJECTS, layout::LOGS] {
            std::fs::create_dir(t.path().join(d)).unwrap();
        }
        let inner = DirConnection::open(t.path()).unwrap();
        (
            t,
            Counting {
                inner,
                reads: Vec::new(),
            },
        )
    }

    #[test]
    fn agent_refuses_an_oversized_manifest_without_downloading_it() {
        let (t, mut src) = chroot();
        let digest = Digest::of(b"huge");
        // Sparse: 64 MiB + 1 on paper, nothing on disk.
        let f = std::fs::File::create(layout::manifest(t.path(), &digest)).unwrap();
        f.set_len(MAX_MANIFEST_BYTES + 1).unwrap();
        let err = manifest(&mut src, digest).unwrap_err();
        assert!(
            matches!(err, RemoteError::TooLarge { limit, .. } if limit == MAX_MANIFEST_BYTES),
            "{err}"
        );
        assert_eq!(src.reads, [], "the manifest was read before it was refused");
        // At the limit it is read (and then judged by its digest, elsewhere).
        f.set_len(16).unwrap();
        assert_eq!(manifest(&mut src, digest).unwrap().len(), 16);
    }

    #[test]
    fn agent_resumes_a_partial_object_and_refuses_a_corrupt_one() {
        let (t, mut src) = chroot();
        let cache = tempfile::tempdir().unwrap();
        let body = b"0123456789abcdef".repeat(100);
        let good = Digest::of(&body);
        std::fs::write(layout::object(t.path(), &good), &body).unwrap();
        // An earlier run got the first 1000 bytes.
        std::fs::write(cache.path().join(partial_name(&good)), &body[..1000]).unwrap();
        let fetched = objects(&mut src, &[(good, body.len() as u64)], cache.path()).unwrap();
        assert_eq!(fetched, body.len() as u64 - 1000);
        assert_eq!(
            std::fs::read(cache.path().join(good.to_hex())).unwrap(),
            body
        );

        // The server's copy does not hash to its name: refused, and the partial is gone.
        let lying = Digest::of(b"what the manifest promised");
        std::fs::write(layout::object(t.path(), &lying), b"something else").unwrap();
        let err = objects(&mut src, &[(lying, 14)], cache.path()).unwrap_err();
        assert!(matches!(err, RemoteError::BadObject { .. }), "{err}");
        assert!(!cache.path().join(partial_name(&lying)).exists());
        assert!(!cache.path().join(lying.to_hex()).exists());
    }
}
