//! `bento publish --export DIR`: a copy of each host's live tree (`current`, the live
//! manifest and its signature, the manifest's objects, `cache/`) in `DIR/<host>/`, for a
//! mirror (a static web server, an `aws s3 sync` or an rsync of DIR).
//!
//! Invariants: read through the [`Store`] (a chroot or an object store alike); a live
//! manifest that does not hash to `current`'s digest is refused and nothing of that host is
//! changed; every file is written whole under a temporary name and renamed, objects and
//! `cache/` first, the manifest and signature next, `current` last, so a server serving DIR
//! never shows a `current` whose files are missing, nor half a file; what the previous
//! export's version needs stays until the next export (a reader may be halfway through it);
//! `logs/` is never copied.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::protocol::layout::{self, Area, Key};
use crate::protocol::manifest::{Digest, Manifest, MAX_MANIFEST_BYTES};
use crate::protocol::signing::MAX_SIGNATURE_BYTES;
use crate::protocol::HostName;
use crate::server::store::{Store, StoreError};

/// The most of one object or `cache/` file copied (a NAR of a large closure fits).
const MAX_FILE_BYTES: u64 = 64 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{host}: `current` does not hold a digest")]
    BadCurrent { host: HostName },
    #[error("{host}: the live manifest {} is missing or does not hash to its digest; nothing exported for it", .digest.short())]
    BadManifest { host: HostName, digest: Digest },
    #[error("{host}: {key} is missing from the store; nothing exported for it")]
    Missing { host: HostName, key: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What one host's export did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub host: HostName,
    /// The live version copied; `None` when nothing is published for the host.
    pub version: Option<Digest>,
    /// Files written (those already there with the same name and size are not).
    pub written: usize,
    /// Files of older versions removed.
    pub removed: usize,
}

/// Copies `host`'s live tree into `dir/<host>/`.
pub fn export_host(
    store: &dyn Store,
    host: &HostName,
    dir: &Path,
) -> Result<Exported, ExportError> {
    let out = dir.join(host.as_str());
    let mut done = Exported {
        host: host.clone(),
        version: None,
        written: 0,
        removed: 0,
    };
    let Some((text, _)) = store.current(host)? else {
        return Ok(done);
    };
    let digest = layout::parse_current(&String::from_utf8_lossy(&text))
        .map_err(|_| ExportError::BadCurrent { host: host.clone() })?;
    let bad = || ExportError::BadManifest {
        host: host.clone(),
        digest,
    };
    let manifest_bytes = store
        .get(host, &Key::Manifest(digest), MAX_MANIFEST_BYTES)?
        .filter(|b| Digest::of(b) == digest)
        .ok_or_else(bad)?;
    let mut manifest = Manifest::parse(&manifest_bytes).map_err(|_| bad())?;
    crate::server::store::trees::expand(store, host, &mut manifest).map_err(|_| bad())?;
    let signature = store.get(host, &Key::Signature(digest), MAX_SIGNATURE_BYTES)?;

    let mut live: BTreeSet<String> = BTreeSet::new();
    let mut files: Vec<Key> = manifest.objects().into_iter().map(Key::Object).collect();
    files.extend(store.list(host, Area::Cache)?);
    for key in &files {
        let rel = key.path();
        live.insert(rel.clone());
        let target = out.join(&rel);
        let immutable = !matches!(key, Key::Cache(p) if p.as_str() == layout::CACHE_INFO);
        if immutable && target.is_file() {
            continue;
        }
        let bytes = store
            .get(host, key, MAX_FILE_BYTES)?
            .ok_or_else(|| ExportError::Missing {
                host: host.clone(),
                key: rel.clone(),
            })?;
        if let Key::Object(d) = key {
            if Digest::of(&bytes) != *d {
                return Err(ExportError::Missing {
                    host: host.clone(),
                    key: format!("{rel} (its bytes do not hash to its name)"),
                });
            }
        }
        write(&target, &bytes)?;
        done.written += 1;
    }
    let previous = std::fs::read_to_string(out.join(layout::CURRENT))
        .ok()
        .and_then(|t| layout::parse_current(&t).ok());
    let mut meta = vec![(Key::Manifest(digest), manifest_bytes.clone())];
    if let Some(sig) = signature {
        meta.push((Key::Signature(digest), sig));
    }
    // The freshness stamp travels with its version: without it a host whose fleet demands
    // stamps finds the mirror stale. Re-export after each `publish --refresh` to carry the
    // new not-after.
    if let Some(stamp) = store.get(host, &Key::Fresh(digest), MAX_SIGNATURE_BYTES)? {
        meta.push((Key::Fresh(digest), stamp));
    }
    for (key, bytes) in &meta {
        live.insert(key.path());
        write(&out.join(key.path()), bytes)?;
        done.written += 1;
    }
    // Last: from here on readers follow the new version, whose files are all in place.
    write(
        &out.join(layout::CURRENT),
        layout::current_text(&digest).as_bytes(),
    )?;
    done.written += 1;
    done.version = Some(digest);

    // The previous version stays whole for a reader that read the old `current`.
    if let Some(prev) = previous.filter(|p| *p != digest) {
        // Its trees are in the export, where the previous run put them.
        let prev_manifest = std::fs::read(out.join(Key::Manifest(prev).path()))
            .ok()
            .and_then(|b| Manifest::parse(&b).ok())
            .and_then(|mut m| {
                m.expand(|d| read_tree(&out.join(Key::Object(*d).path()), d))
                    .ok()?;
                Some(m)
            });
        if let Some(m) = prev_manifest {
            live.extend(m.objects().into_iter().map(|d| Key::Object(d).path()));
            live.insert(Key::Manifest(prev).path());
            live.insert(Key::Signature(prev).path());
            live.insert(Key::Fresh(prev).path());
        }
    }
    for area in [layout::OBJECTS, layout::MANIFESTS] {
        let Ok(rd) = std::fs::read_dir(out.join(area)) else {
            continue;
        };
        for e in rd.flatten() {
            let rel = format!("{area}/{}", e.file_name().to_string_lossy());
            if !live.contains(&rel) && e.file_type().is_ok_and(|t| t.is_file()) {
                std::fs::remove_file(e.path()).map_err(|source| ExportError::Io {
                    path: e.path(),
                    source,
                })?;
                done.removed += 1;
            }
        }
    }
    Ok(done)
}

/// Writes `bytes` to `path` whole (a temporary name, then a rename), readable by a web
/// server (0644): what it holds is what the host may read, never a secret in clear.
fn write(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let io = |source| ExportError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    crate::sys::atomic::write_file(path, bytes, 0o644).map_err(io)
}

/// A tree object of a directory laid out as a chroot (an export, a host's directory).
pub fn read_tree(
    path: &Path,
    digest: &Digest,
) -> Result<Vec<u8>, crate::protocol::tree::TreeError> {
    std::fs::read(path).map_err(|e| crate::protocol::tree::TreeError::Missing {
        tree: *digest,
        reason: format!("{}: {e}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::MemStore;

    #[test]
    fn export_copies_the_live_tree_current_last_and_refuses_a_broken_one() {
        let store = MemStore::default();
        let host = HostName::new("alpha").unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Nothing published: nothing written.
        let e = export_host(&store, &host, dir.path()).unwrap();
        assert_eq!(e.version, None);
        assert!(!dir.path().join("alpha").exists());

        let body = b"hello\n";
        let obj = Digest::of(body);
        let mut m = Manifest {
            format: 1,
            host: host.clone(),
            created: crate::protocol::Timestamp::seconds(std::time::UNIX_EPOCH),
            serial: 1,
            source_commit: None,
            dirty: false,
            build: crate::protocol::manifest::Build::Flake,
            system: None,
            config: vec![crate::protocol::manifest::ConfigEntry::File {
                path: crate::protocol::manifest::RelPath::new("flake.nix").unwrap(),
                size: body.len() as u64,
                sha256: obj,
                executable: false,
            }],
            tree: None,
            files: Vec::new(),
        };
        m.canonicalize();
        let bytes = m.to_bytes();
        let d = Digest::of(&bytes);
        store
            .put_object(&host, &obj, &|| Ok(Box::new(&body[..])))
            .unwrap();
        store.put(&host, &Key::Manifest(d), &bytes).unwrap();
        store.switch_current(&host, &d, None).unwrap();
        let e = export_host(&store, &host, dir.path()).unwrap();
        assert_eq!(e.version, Some(d));
        let out = dir.path().join("alpha");
        assert_eq!(
            std::fs::read(out.join(Key::Object(obj).path())).unwrap(),
            body
        );
        assert_eq!(
            std::fs::read_to_string(out.join("current")).unwrap(),
            layout::current_text(&d)
        );
        assert!(!out.join("logs").exists());

        // A manifest that does not hash to its name: refused, the copy left as it was.
        let other = Digest::of(b"another version");
        store.put(&host, &Key::Manifest(other), &bytes).unwrap();
        let version = store.current(&host).unwrap().unwrap().1;
        store.switch_current(&host, &other, Some(&version)).unwrap();
        let err = export_host(&store, &host, dir.path()).unwrap_err();
        assert!(matches!(err, ExportError::BadManifest { .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(out.join("current")).unwrap(),
            layout::current_text(&d)
        );
    }
}
