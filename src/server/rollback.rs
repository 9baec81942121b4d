//! `bento rollback`: make a kept earlier version live again, from the server. The earlier
//! manifest's content is published as a *new* version (the next serial and a fresh
//! `created` time, signed like every publish), so agents accept it under their replay rule and the host goes back
//! without anyone logging in. Its objects are still in the host's `objects/` (publish keeps
//! every object of the kept versions), so nothing but the manifest and `current` is written,
//! in the same order and under the same lock as a publish.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;

use crate::protocol::layout::{Area, Key};
use crate::protocol::manifest::{Digest, Manifest, MAX_MANIFEST_BYTES};
use crate::protocol::HostName;
use crate::server::publish::{self, HostPlan, PublishError, Status};
use crate::server::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("{host}: nothing is published for it")]
    NothingPublished { host: HostName },
    #[error("{host}: no kept version other than the live one ({live}) to go back to")]
    NothingEarlier { host: HostName, live: String },
    #[error("{host}: no kept version {version}; kept: {kept}")]
    UnknownVersion {
        host: HostName,
        version: String,
        kept: String,
    },
    #[error("{host}: version {version} is ambiguous; give more of the digest")]
    Ambiguous { host: HostName, version: String },
    #[error("{host}: {version} is the live version already")]
    AlreadyLive { host: HostName, version: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{host}: {source}")]
    Publish {
        host: HostName,
        source: Box<PublishError>,
    },
}

/// A version still in the host's `manifests/`.
#[derive(Debug, Clone)]
pub struct Kept {
    pub digest: Digest,
    pub manifest: Manifest,
    pub live: bool,
}

/// The host's kept versions, newest first (by `serial`, then `created`), the live one included.
pub fn kept_versions(store: &dyn Store, host: &HostName) -> Result<Vec<Kept>, RollbackError> {
    let live = publish::live_digest(store, host)
        .ok_or_else(|| RollbackError::NothingPublished { host: host.clone() })?;
    let mut out = Vec::new();
    for key in store.list(host, Area::Manifests)? {
        let Key::Manifest(digest) = key else {
            continue;
        };
        let Ok(Some(bytes)) = store.get(host, &key, MAX_MANIFEST_BYTES) else {
            continue;
        };
        // The server's own files, but checked like a reader would: a manifest that does not
        // hash to its name, or is not this host's, is no version to go back to.
        let parsed = Manifest::parse_untrusted(&bytes, &digest, host)
            .and_then(|mut m| crate::server::store::trees::expand(store, host, &mut m).map(|()| m));
        if let Ok(manifest) = parsed {
            out.push(Kept {
                digest,
                manifest,
                live: digest == live,
            });
        }
    }
    out.sort_by(|a, b| (b.manifest.order().cmp(&a.manifest.order())).then(b.digest.cmp(&a.digest)));
    Ok(out)
}

/// The version to go back to: the one `to` names (a digest prefix), else the newest kept
/// version whose content differs from the live one.
pub fn choose<'a>(
    host: &HostName,
    kept: &'a [Kept],
    to: Option<&str>,
) -> Result<&'a Kept, RollbackError> {
    let live = kept.iter().find(|k| k.live);
    match to {
        Some(prefix) => {
            let found: Vec<&Kept> = kept
                .iter()
                .filter(|k| k.digest.to_hex().starts_with(&prefix.to_ascii_lowercase()))
                .collect();
            match found.as_slice() {
                [one] if one.live => Err(RollbackError::AlreadyLive {
                    host: host.clone(),
                    version: one.digest.short(),
                }),
                [one] => Ok(one),
                [] => Err(RollbackError::UnknownVersion {
                    host: host.clone(),
                    version: prefix.to_owned(),
                    kept: describe(kept),
                }),
                _ => Err(RollbackError::Ambiguous {
                    host: host.clone(),
                    version: prefix.to_owned(),
                }),
            }
        }
        None => kept
            .iter()
            .find(|k| !k.live && live.is_none_or(|l| !l.manifest.same_content(&k.manifest)))
            .ok_or_else(|| RollbackError::NothingEarlier {
                host: host.clone(),
                live: live.map_or_else(|| "-".into(), |l| l.digest.short()),
            }),
    }
}

fn describe(kept: &[Kept]) -> String {
    kept.iter()
        .map(|k| {
            format!(
                "{} ({}{})",
                k.digest.short(),
                k.manifest.created,
                if k.live { ", live" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one rollback did.
#[derive(Debug, Clone, Serialize)]
pub struct RolledBack {
    pub host: HostName,
    /// The version that was live.
    pub from: Option<Digest>,
    /// The earlier version whose content is live again.
    pub to: Digest,
    /// The new version carrying that content.
    pub version: Digest,
    pub created: String,
    pub system: Option<String>,
}

/// The rollback plan of one host: the earlier manifest with a fresh `created`.
pub fn plan(target: &Kept, now: SystemTime) -> HostPlan {
    let mut manifest = target.manifest.clone();
    manifest.created = crate::protocol::Timestamp::millis(now);
    HostPlan {
        host: manifest.host.clone(),
        manifest,
        // Every object is in the host's objects/ already: publish_host links none.
        sources: Default::default(),
        keep_live: None,
        live: None,
    }
}

/// Rolls `host` back. The caller holds the publish lock (`publish::open_chroot`).
pub fn rollback_host(
    store: &dyn Store,
    host: &HostName,
    to: Option<&str>,
    now: SystemTime,
    numbering: &publish::Numbering<'_>,
) -> Result<RolledBack, RollbackError> {
    let kept = kept_versions(store, host)?;
    let from = kept.iter().find(|k| k.live).map(|k| k.digest);
    let target = choose(host, &kept, to)?;
    // Objects vanish only when no kept manifest uses them; check before writing anything.
    for d in target.manifest.objects() {
        if !store.exists(host, &Key::Object(d))? {
            return Err(RollbackError::Io {
                path: store.locate(host, &Key::Object(d)),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "object of that version is gone",
                ),
            });
        }
    }
    let plan = plan(target, now);
    let report = publish::publish_host(store, &plan, numbering).map_err(|source| {
        RollbackError::Publish {
            host: host.clone(),
            source: Box::new(source),
        }
    })?;
    let version = match (report.status, report.digest) {
        (Status::Published, Some(d)) => d,
        // Same content as the live version: `choose` refuses that, so this is a race.
        _ => {
            return Err(RollbackError::AlreadyLive {
                host: host.clone(),
                version: target.digest.short(),
            })
        }
    };
    Ok(RolledBack {
        host: host.clone(),
        from,
        to: target.digest,
        version,
        created: plan.manifest.created.to_string(),
        system: plan.manifest.system.as_ref().map(|s| s.as_str().to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::layout::Chroot;

    use crate::server::publish::Ownership;
    use crate::server::store::ChrootStore;

    fn host() -> HostName {
        HostName::new("alpha").unwrap()
    }

    /// Publishes a one-file version of `text` at `secs` through the real publish code.
    fn publish(store: &dyn Store, text: &str, secs: u64) -> Digest {
        let plan =
            crate::server::publish::fixture::plan("alpha", &[("configuration.nix", text)], secs);
        publish::publish_host(store, &plan, &Default::default())
            .unwrap()
            .digest
            .unwrap()
    }

    #[test]
    fn goes_back_to_the_previous_content_as_a_new_newer_version() {
        let tmp = tempfile::tempdir().unwrap();
        let chroot = ChrootStore::new(Chroot::new(tmp.path()), Ownership::Leave);
        std::fs::create_dir_all(chroot.chroot().pool_dir()).unwrap();
        std::fs::create_dir_all(chroot.chroot().tmp_dir()).unwrap();
        let v1 = publish(&chroot, "one", 1_790_000_000);
        let v2 = publish(&chroot, "two", 1_790_000_100);
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_790_000_200);

        let r = rollback_host(&chroot, &host(), None, now, &Default::default()).unwrap();
        assert_eq!((r.from, r.to), (Some(v2), v1));
        assert_ne!(r.version, v1, "a new version, not the old one replayed");
        let (live, m) = publish::live_version(&chroot, &host()).unwrap();
        assert_eq!(live, r.version);
        let kept = kept_versions(&chroot, &host()).unwrap();
        let old = kept.iter().find(|k| k.digest == v1).unwrap();
        assert!(m.same_content(&old.manifest));
        assert!(m.created > old.manifest.created && m.created > kept[1].manifest.created);
        assert!(kept[0].live);

        // Again: the newest content differing from the live one is v2's.
        let later = now + std::time::Duration::from_secs(10);
        let r = rollback_host(&chroot, &host(), None, later, &Default::default()).unwrap();
        assert_eq!(r.to, v2);
        // --to names a version by a digest prefix; the live one and unknown ones are refused.
        let live = publish::live_version(&chroot, &host()).unwrap().0;
        let err = rollback_host(
            &chroot,
            &host(),
            Some(&live.short()),
            later,
            &Default::default(),
        )
        .unwrap_err();
        assert!(matches!(err, RollbackError::AlreadyLive { .. }), "{err}");
        let err = rollback_host(
            &chroot,
            &host(),
            Some("ffff0000"),
            later,
            &Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("alpha") && err.contains("ffff0000") && err.contains("live"),
            "{err}"
        );
    }

    #[test]
    fn nothing_to_go_back_to() {
        let tmp = tempfile::tempdir().unwrap();
        let chroot = ChrootStore::new(Chroot::new(tmp.path()), Ownership::Leave);
        std::fs::create_dir_all(chroot.chroot().pool_dir()).unwrap();
        std::fs::create_dir_all(chroot.chroot().tmp_dir()).unwrap();
        let now = SystemTime::now();
        let err = rollback_host(&chroot, &host(), None, now, &Default::default()).unwrap_err();
        assert!(matches!(err, RollbackError::NothingPublished { .. }));
        publish(&chroot, "one", 1_790_000_000);
        let err = rollback_host(&chroot, &host(), None, now, &Default::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("no kept version other than the live one"),
            "{err}"
        );
    }
}
