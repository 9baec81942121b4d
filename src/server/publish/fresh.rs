//! Freshness stamps on the server's side (`[server] freshness`): publish stamps every
//! version it leaves live, and `bento publish --refresh` re-signs the stamps of the live
//! versions and writes nothing else (no manifest, no `current`, no serial).
//!
//! Invariant: a stamp is written for a digest only while that digest's manifest is in the
//! store and before `current` names it (`manifests/<digest>.fresh`, as the signature), so
//! no reader can take one version's stamp for another's.

use std::time::{Duration, SystemTime};

use super::PublishError;
use crate::protocol::freshness::FreshStamp;
use crate::protocol::layout::Key;
use crate::protocol::manifest::{Digest, Manifest, MAX_MANIFEST_BYTES};
use crate::protocol::signing::Signer;
use crate::protocol::HostName;
use crate::server::fleet::FleetConfig;
use crate::server::store::Store;

/// The stamps a run writes: how long they vouch, from when.
#[derive(Debug, Clone, Copy)]
pub struct Stamping {
    pub window: Duration,
    pub now: SystemTime,
}

/// The fleet's freshness window, when it sets one. A window needs the signing key: an
/// unsigned stamp is worth nothing to a host that verifies, and says nothing to one that
/// does not.
pub fn window(
    config: &FleetConfig,
    signer: Option<&Signer>,
) -> Result<Option<Duration>, PublishError> {
    match (config.server.freshness, signer) {
        (Some(_), None) => Err(PublishError::FreshnessUnsigned),
        (w, _) => Ok(w),
    }
}

/// Writes the stamp of `version` (serial `serial`) of `host`, when the run stamps.
pub fn stamp(
    store: &dyn Store,
    host: &HostName,
    version: Digest,
    serial: u64,
    signer: Option<&Signer>,
    stamping: Option<Stamping>,
) -> Result<(), PublishError> {
    let (Some(signer), Some(s)) = (signer, stamping) else {
        return Ok(());
    };
    let bytes = FreshStamp::new(host, version, serial, s.now, s.window).sign(signer)?;
    store.put(host, &Key::Fresh(version), &bytes)?;
    Ok(())
}

/// What `--refresh` did to one host.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Refreshed {
    pub host: HostName,
    /// The live version whose stamp was re-signed (`None`: nothing is live, nothing done).
    pub version: Option<Digest>,
    pub error: Option<String>,
}

/// Re-signs the stamp of each host's live version, running out `window` after `now`.
/// Reads `current` and the live manifest (for its serial); writes the stamp only.
pub fn refresh(
    store: &dyn Store,
    hosts: &[HostName],
    signer: &Signer,
    stamping: Stamping,
) -> Vec<Refreshed> {
    hosts
        .iter()
        .map(|host| {
            let done = refresh_host(store, host, signer, stamping);
            let (version, error) = match done {
                Ok(v) => (v, None),
                Err(e) => (None, Some(e.to_string())),
            };
            Refreshed {
                host: host.clone(),
                version,
                error,
            }
        })
        .collect()
}

fn refresh_host(
    store: &dyn Store,
    host: &HostName,
    signer: &Signer,
    stamping: Stamping,
) -> Result<Option<Digest>, PublishError> {
    let Some((bytes, _)) = store.current(host)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes);
    let digest = crate::protocol::layout::parse_current(&text).map_err(|e| {
        PublishError::Internal(format!(
            "{}: {e}",
            store.locate(host, &Key::Current).display()
        ))
    })?;
    let key = Key::Manifest(digest);
    let manifest = store
        .get(host, &key, MAX_MANIFEST_BYTES)?
        .filter(|b| Digest::of(b) == digest)
        .and_then(|b| Manifest::parse(&b).ok())
        .ok_or_else(|| {
            PublishError::Internal(format!(
                "{}: missing or not the manifest `current` names; publish the host again",
                store.locate(host, &key).display()
            ))
        })?;
    stamp(
        store,
        host,
        digest,
        manifest.serial,
        Some(signer),
        Some(stamping),
    )?;
    Ok(Some(digest))
}
