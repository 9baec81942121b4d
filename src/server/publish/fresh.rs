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

#[cfg(test)]
mod tests {

    use super::*;

    use crate::protocol::signing;
    use crate::server::publish::{publish_host, HostPlan, Numbering, Status};
    use crate::server::store::MemStore;

    fn web() -> HostName {
        HostName::new("web").unwrap()
    }

    fn plan(text: &str) -> HostPlan {
        crate::server::publish::fixture::plan("web", &[("configuration.nix", text)], 1_700_000_000)
    }

    fn stamp_of(store: &MemStore, live: Digest, trusted: &[ssh_key::PublicKey]) -> FreshStamp {
        let bytes = store.get(&web(), &Key::Fresh(live), 4096).unwrap().unwrap();
        FreshStamp::parse_untrusted(&bytes, &web(), &live, Some(trusted)).unwrap()
    }

    #[test]
    fn publish_stamps_each_live_version_and_refresh_moves_only_the_stamp() {
        let t = tempfile::tempdir().unwrap();
        let public = signing::generate(&t.path().join("key"), "test").unwrap();
        let trusted = signing::parse_trusted(&[public.to_openssh().unwrap()]).unwrap();
        let signer = Signer::load(&t.path().join("key")).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let window = Duration::from_secs(7 * 86_400);
        let numbering = |now| Numbering {
            signer: Some(&signer),
            stamping: Some(Stamping { window, now }),
            ..Default::default()
        };
        let store = MemStore::new();
        let first = publish_host(&store, &plan("a"), &numbering(t0)).unwrap();
        let v1 = first.digest.unwrap();
        let s = stamp_of(&store, v1, &trusted);
        assert_eq!((s.serial, s.not_after.system_time()), (1, t0 + window));

        // A new version gets its own stamp; the old one's goes with its manifest only.
        let v2 = publish_host(&store, &plan("b"), &numbering(t0))
            .unwrap()
            .digest
            .unwrap();
        assert_eq!(stamp_of(&store, v2, &trusted).serial, 2);
        assert!(store.exists(&web(), &Key::Fresh(v1)).unwrap());
        for text in ["c", "d"] {
            publish_host(&store, &plan(text), &numbering(t0)).unwrap();
        }
        assert!(!store.exists(&web(), &Key::Manifest(v1)).unwrap());
        assert!(
            !store.exists(&web(), &Key::Fresh(v1)).unwrap(),
            "a stamp without its manifest is collected"
        );

        // An unchanged publish re-stamps the live version and writes nothing else.
        let live = crate::server::publish::live_version(&store, &web())
            .unwrap()
            .0;
        let before = store.keys(&web());
        let t1 = t0 + Duration::from_secs(3600);
        let r = publish_host(&store, &plan("d"), &numbering(t1)).unwrap();
        assert_eq!(r.status, Status::Unchanged);
        assert_eq!(store.keys(&web()), before);
        let s = stamp_of(&store, live, &trusted);
        assert_eq!(s.not_after.system_time(), t1 + window);

        // --refresh: the same, without a plan; `current` and the manifests untouched.
        let current = store.current(&web()).unwrap().unwrap().0;
        let manifest = store.get(&web(), &Key::Manifest(live), 1 << 20).unwrap();
        let t2 = t1 + Duration::from_secs(3600);
        let done = refresh(&store, &[web()], &signer, Stamping { window, now: t2 });
        assert_eq!(done[0].version, Some(live), "{done:?}");
        assert_eq!(store.keys(&web()), before);
        assert_eq!(store.current(&web()).unwrap().unwrap().0, current);
        assert_eq!(
            store.get(&web(), &Key::Manifest(live), 1 << 20).unwrap(),
            manifest
        );
        let s = stamp_of(&store, live, &trusted);
        assert_eq!((s.serial, s.not_after.system_time()), (4, t2 + window));

        // A host with nothing live gets nothing.
        let none = HostName::new("none").unwrap();
        let done = refresh(&store, &[none], &signer, Stamping { window, now: t2 });
        assert_eq!((done[0].version, done[0].error.as_deref()), (None, None));
    }
}
