//! Checking a published host the way a host would read it: `current` names a manifest
//! whose bytes hash to that name, and every object it lists exists and hashes right.

use std::path::{Path, PathBuf};

use crate::protocol::layout;
use crate::protocol::manifest::{Digest, Manifest, ManifestError};
use crate::protocol::HostName;
use crate::server::snapshot::hash_file;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: does not hold a digest")]
    BadCurrent { path: PathBuf },
    #[error("{path}: {source}")]
    Manifest {
        path: PathBuf,
        source: ManifestError,
    },
    #[error("{path}: content hashes to {actual}, not its name")]
    BadObject { path: PathBuf, actual: Digest },
}

/// Verifies the live version of `host` in `host_dir`; returns its digest, or `None` when
/// nothing was ever published.
pub fn verify_host(host_dir: &Path, host: &HostName) -> Result<Option<Digest>, VerifyError> {
    let current = layout::current(host_dir);
    let text = match std::fs::read_to_string(&current) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(VerifyError::Io {
                path: current,
                source,
            })
        }
    };
    let digest = layout::parse_current(&text).map_err(|_| VerifyError::BadCurrent {
        path: current.clone(),
    })?;
    let mpath = layout::manifest(host_dir, &digest);
    let bytes = std::fs::read(&mpath).map_err(|source| VerifyError::Io {
        path: mpath.clone(),
        source,
    })?;
    let manifest = Manifest::parse_untrusted(&bytes, &digest, host)
        .and_then(|mut m| {
            m.expand(|d| crate::server::export::read_tree(&layout::object(host_dir, d), d))
                .map(|()| m)
        })
        .map_err(|source| VerifyError::Manifest {
            path: mpath.clone(),
            source,
        })?;
    for object in manifest.objects() {
        let path = layout::object(host_dir, &object);
        let actual = hash_file(&path).map_err(|source| VerifyError::Io {
            path: path.clone(),
            source,
        })?;
        if actual != object {
            return Err(VerifyError::BadObject { path, actual });
        }
    }
    Ok(Some(digest))
}
