//! The next serial of a host: above the highest serial the publisher can prove, never
//! wrapped or saturated. Proof is the publisher's own record (`server::records`), a kept
//! manifest whose signature verifies with the fleet key, and the serial the host itself
//! reports having applied (its heartbeat). A serial nothing proves (an unsigned or wrongly
//! signed manifest in a signing fleet; in an unsigned fleet, one above the record) is never
//! numbered from: a restored or edited chroot cannot lock hosts out for good.

use crate::protocol::layout::{Area, Key};
use crate::protocol::manifest::{Digest, Manifest, MAX_MANIFEST_BYTES};
use crate::protocol::report::{Heartbeat, HEARTBEAT_FILE};
use crate::protocol::HostName;
use crate::server::records::Serials;
use crate::server::store::{Store, Version};

use super::PublishError;

/// How a publish numbers versions.
#[derive(Clone, Copy, Default)]
pub struct Numbering<'a> {
    /// Signs every manifest; its public key is what proves a kept manifest's serial.
    pub signer: Option<&'a crate::protocol::signing::Signer>,
    /// The publisher's serial record (`None`: none kept, as in unit tests of other rules).
    pub record: Option<&'a Serials>,
    /// `bento publish --serial-floor N`: new versions get at least serial N.
    pub floor: Option<u64>,
    /// `publish --dry-run`: the record is read, never raised.
    pub dry_run: bool,
    /// `[server] freshness`: each version left live gets a stamp signed by `signer`.
    pub stamping: Option<super::Stamping>,
    /// What the publisher remembers of kept versions (`None`: every one is read).
    pub versions: Option<&'a super::versions::Versions>,
}

impl<'a> Numbering<'a> {
    pub fn signed(signer: Option<&'a crate::protocol::signing::Signer>) -> Self {
        Self {
            signer,
            ..Self::default()
        }
    }
}

/// What the numbering found for one host.
#[derive(Debug)]
pub struct Next {
    /// The serial a new version gets.
    pub serial: u64,
    /// The live version cannot stay, even with the same content: its serial is not proven,
    /// below the floor, or not above what the host applied (the host would refuse it).
    pub renumber: bool,
    /// What the operator should know (a serial that was not trusted).
    pub warnings: Vec<String>,
    /// Manifests whose serial nothing proves and is above the new one: removed once the new
    /// version is live, or they would stay the "newest" kept versions for good.
    pub discard: Vec<Digest>,
    /// The format-2 manifests read on the way (small: their trees unread), so collecting
    /// after the switch reads none of them again.
    pub read: super::collect::Known,
}

/// Whether manifest `digest` of `host` has a signature that verifies with `keys`. `bytes`
/// are the manifest's, if read already (`None`: read now, and only if they match `digest`).
fn signed(
    store: &dyn Store,
    host: &HostName,
    digest: &Digest,
    bytes: Option<Vec<u8>>,
    keys: &[ssh_key::PublicKey],
) -> bool {
    let bytes = bytes.or_else(|| {
        store
            .get(host, &Key::Manifest(*digest), MAX_MANIFEST_BYTES)
            .ok()
            .flatten()
            .filter(|b| Digest::of(b) == *digest)
    });
    let sig = || {
        store
            .get(host, &Key::Signature(*digest), 64 * 1024)
            .ok()
            .flatten()
    };
    bytes.is_some_and(|bytes| {
        sig().is_some_and(|sig| crate::protocol::signing::verify(keys, &bytes, &sig).is_ok())
    })
}

/// Works out the next serial of `host`, whose live version is `live` with `current` at
/// `version`.
///
/// The host's heartbeat is not read when it already confirmed `live` while `current` was
/// at `version` ([`Store::confirmed`]; a confirmation is only kept while the record held
/// `live`'s serial): it then reports `live`'s serial, which the record proves already, and
/// nothing that would renumber. The same reasoning as [`numbered_last`]'s, with the same
/// limit: the store and the publisher's state restored together keep a confirmation they
/// should not (the host then refuses the new version as a replay, its refusal voids
/// nothing, and since the new `current` voids the confirmation the next publish reads the
/// refusing heartbeat and numbers above it; docs/operators.md has the operator remove the
/// index after such a restore).
pub fn next(
    store: &dyn Store,
    host: &HostName,
    live: Option<&(Digest, Manifest)>,
    version: Option<&Version>,
    numbering: &Numbering<'_>,
) -> Result<Next, PublishError> {
    let recorded = match numbering.record {
        Some(r) => r.get(host).map_err(|source| PublishError::Io {
            path: std::path::PathBuf::from(format!("serial record of {host}")),
            source,
        })?,
        None => None,
    };
    let public = numbering.signer.map(|s| [s.public()]);
    let confirmed = live.is_some_and(|(_, m)| recorded.is_some_and(|r| r >= m.serial))
        && version.is_some_and(|v| store.confirmed(host, v));
    let heartbeat = match confirmed {
        true => None,
        false => reported(store, host),
    };
    let reported_serial = heartbeat.as_ref().and_then(|h| h.serial);

    let mut proven = recorded.unwrap_or(0).max(reported_serial.unwrap_or(0));
    // The highest serial a manifest claims that nothing proves, and which manifest.
    let mut unproven: Option<(u64, Digest)> = None;
    let mut unproven_all: Vec<(u64, Digest)> = Vec::new();
    let mut live_proven = false;
    let mut read = super::collect::Known::default();
    for key in &store.list(host, Area::Manifests)? {
        let Key::Manifest(digest) = *key else {
            continue;
        };
        let is_live = live.is_some_and(|(d, _)| *d == digest);
        // A version remembered with a serial the record or the heartbeat proves: nothing
        // to read (it can prove no higher serial than they do).
        let remembered = match (is_live, numbering.versions) {
            (false, Some(versions)) => versions.get(host, &digest).filter(|s| {
                recorded.is_some_and(|r| s.serial <= r)
                    || reported_serial.is_some_and(|r| s.serial <= r)
            }),
            _ => None,
        };
        if let Some(summary) = remembered {
            proven = proven.max(summary.serial);
            read.keep(digest, Some(summary));
            continue;
        }
        // The live manifest was read and checked against its digest by the caller.
        let (m, bytes) = match live.filter(|(d, _)| *d == digest) {
            Some((_, m)) => (m.clone(), None),
            None => {
                let Some(bytes) = store.get(host, key, MAX_MANIFEST_BYTES).ok().flatten() else {
                    continue;
                };
                if Digest::of(&bytes) != digest {
                    continue;
                }
                let Ok(m) = Manifest::parse(&bytes) else {
                    continue;
                };
                (m, Some(bytes))
            }
        };
        // The record and the heartbeat first: a serial they prove needs no signature read
        // (on an object store, a request per kept manifest).
        let trusted = recorded.is_some_and(|r| m.serial <= r)
            || reported_serial.is_some_and(|r| m.serial <= r)
            || match &public {
                Some(keys) => signed(store, host, &digest, bytes, keys),
                // An unsigned fleet without a record yet: the manifests are all there is.
                None => recorded.is_none(),
            };
        if trusted {
            proven = proven.max(m.serial);
            live_proven |= is_live;
        } else {
            unproven_all.push((m.serial, digest));
            if unproven.is_none_or(|(s, _)| m.serial > s) {
                unproven = Some((m.serial, digest));
            }
        }
        crate::server::store::trees::know_root(&m);
        read.keep(digest, super::versions::Summary::of(&m));
    }

    let mut warnings = Vec::new();
    if let Some((claimed, digest)) = unproven.filter(|(s, _)| *s > proven) {
        let why = match (&public, recorded) {
            (Some(_), _) => "its signature does not verify with the fleet key".to_owned(),
            (None, Some(r)) => format!("this publisher last numbered serial {r} for it"),
            (None, None) => unreachable!("an unsigned fleet without a record trusts every serial"),
        };
        if public.is_none() && numbering.floor.is_none() {
            return Err(PublishError::SerialJump {
                host: host.clone(),
                detail: format!(
                    "manifest {} claims serial {claimed}, but {why}: publish did not make that jump and will not number from it",
                    digest.short()
                ),
            });
        }
        warnings.push(format!(
            "{host}: manifest {} claims serial {claimed}, but {why}; that serial is not trusted: numbering continues from {proven}, and manifests numbered above the new version are removed once it is live",
            digest.short()
        ));
    }

    let serial = proven
        .checked_add(1)
        .ok_or_else(|| PublishError::SerialJump {
            host: host.clone(),
            detail: format!(
                "serial {proven} is the highest there is, so no newer version can be numbered"
            ),
        })?
        .max(numbering.floor.unwrap_or(0));
    let renumber = match live {
        None => false,
        Some((digest, m)) => {
            !live_proven
                || numbering.floor.is_some_and(|f| m.serial < f)
                // The host applied another version with this serial or a newer one: it would
                // refuse the live one as a replay.
                || heartbeat.as_ref().is_some_and(|h| {
                    reported_serial.is_some_and(|r| r >= m.serial) && h.version != Some(*digest)
                })
        }
    };
    if let Some(record) = numbering.record.filter(|_| !numbering.dry_run) {
        // What is proven live is recorded even when nothing new is written, so the record
        // exists from the first publish of a fleet on.
        record
            .raise(host, proven)
            .map_err(|source| PublishError::Io {
                path: std::path::PathBuf::from(format!("serial record of {host}")),
                source,
            })?;
    }
    let discard = unproven_all
        .into_iter()
        .filter(|(s, _)| *s >= serial)
        .map(|(_, d)| d)
        .collect();
    Ok(Next {
        serial,
        renumber,
        warnings,
        discard,
        read,
    })
}

/// The live version `live` (serial `serial`) is the last one this publisher numbered for
/// `host` (its record says exactly that serial) and the host's heartbeat does not report a
/// serial at or above it for another version (a publisher that lost its record, then
/// numbered again from 1). Then the kept manifests can prove nothing newer, and an unchanged
/// host needs no listing of them: a no-change publish reads `current` and the heartbeat
/// (both conditional on an object store), nothing else.
///
/// `version` is `current`'s version as read for this publish (an object store's ETag). When
/// the store says the host's heartbeat already confirmed running `live` while `current` was
/// at that very version ([`Store::confirmed`]), the heartbeat is not read again: one request
/// per unchanged host on an object store instead of two. Why that loses nothing:
/// - A host refuses a serial at or below the one it applied, so once its heartbeat said it
///   runs `live` at `serial`, it had applied nothing numbered higher. A serial above
///   `serial` can reach it afterwards only from a manifest written since: this publisher
///   raises its record first (the record would not equal `serial`), and any publisher or
///   rollback makes it live by writing `current` with a new digest (every version has its own
///   serial, so its own bytes), which changes the version the confirmation was tied to.
/// - A publisher state restored from a backup while the store was not holds an older
///   version of `current` than the engine: no confirmation matches, the heartbeat is read.
///   Two publishers keep two states: what one writes voids the other's confirmation.
/// - What a version cannot tell: the store and the publisher's state restored together
///   (the same bytes, the same ETag), or a mirror exported before the publisher lost its
///   records still holding a higher serial that the host takes while the server is
///   unreachable. Both need a publisher that once numbered below a serial that existed; a
///   mirror is an export of live versions, so it holds nothing above the serials this
///   publisher numbered otherwise. For those, a confirmation expires (the object store's is
///   a day, `s3index::CONFIRMATION_SECS`); a new version numbered meanwhile is refused by
///   the host as a replay, and its new `current` voids the confirmation, so the next
///   publish reads the refusing heartbeat and numbers above it (the refusal names
///   `--serial-floor` meanwhile).
/// - A host whose heartbeat is missing, is another version's or lacks `serial` confirms
///   nothing: its heartbeat is read on every publish, as the restored-server repair needs.
pub fn numbered_last(
    store: &dyn Store,
    numbering: &Numbering<'_>,
    host: &HostName,
    live: &Digest,
    serial: u64,
    version: Option<&Version>,
) -> Result<bool, PublishError> {
    let Some(record) = numbering.record else {
        return Ok(false);
    };
    let recorded = record.get(host).map_err(|source| PublishError::Io {
        path: std::path::PathBuf::from(format!("serial record of {host}")),
        source,
    })?;
    if serial == 0 || recorded != Some(serial) || numbering.floor.is_some() {
        return Ok(false);
    }
    if version.is_some_and(|v| store.confirmed(host, v)) {
        return Ok(true);
    }
    let heartbeat = reported(store, host);
    if let (Some(v), false) = (version, numbering.dry_run) {
        if heartbeat
            .as_ref()
            .is_some_and(|h| h.version == Some(*live) && h.serial == Some(serial))
        {
            store.confirm(host, v);
        }
    }
    Ok(!heartbeat
        .is_some_and(|h| h.serial.is_some_and(|r| r >= serial) && h.version != Some(*live)))
}

/// The host's heartbeat, when it is there, readable and its own.
fn reported(store: &dyn Store, host: &HostName) -> Option<Heartbeat> {
    // As status reads it: an object store answers an unchanged heartbeat with a 304.
    let (bytes, _) = store.read_log_received(host, HEARTBEAT_FILE).ok()?;
    Heartbeat::parse(&bytes).ok().filter(|h| &h.host == host)
}

/// Records `serial` as numbered for `host`, before a manifest carrying it is written.
pub fn record(numbering: &Numbering<'_>, host: &HostName, serial: u64) -> Result<(), PublishError> {
    match numbering.record {
        Some(r) => r.raise(host, serial).map_err(|source| PublishError::Io {
            path: std::path::PathBuf::from(format!("serial record of {host}")),
            source,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::protocol::layout::Key;

    use crate::server::publish::{publish_host, HostPlan, Status};
    use crate::server::store::MemStore;

    fn web() -> HostName {
        HostName::new("web").unwrap()
    }

    fn plan(text: &str) -> HostPlan {
        crate::server::publish::fixture::plan("web", &[("configuration.nix", text)], 1_700_000_000)
    }

    fn live_serial(store: &MemStore) -> u64 {
        crate::server::publish::live_version(store, &web())
            .unwrap()
            .1
            .serial
    }

    /// Loses every manifest and `current`, as a restore of an old backup or a new disk does.
    fn lose_versions(store: &MemStore) {
        for key in store.keys(&web()) {
            // `current` stays, naming a manifest that is gone: no live version.
            if matches!(key, Key::Manifest(_) | Key::Signature(_)) {
                store.delete(&web(), &key).unwrap();
            }
        }
    }

    fn heartbeat(serial: u64) -> Vec<u8> {
        format!(
            r#"{{"format":1,"host":"web","time":"2026-01-01T00:00:00Z","version":null,"system":null,"last_outcome":null,"last_report":null,"agent_version":"0","serial":{serial}}}"#
        )
        .into_bytes()
    }

    /// The heartbeat of a host that applied `version` at `serial`.
    fn running(version: &Digest, serial: u64) -> Vec<u8> {
        let h = String::from_utf8(heartbeat(serial)).unwrap();
        h.replace("\"version\":null", &format!("\"version\":\"{version}\""))
            .into_bytes()
    }

    /// Puts a manifest nobody signed with the fleet key live, with the given serial.
    fn forge_live(store: &MemStore, serial: u64) -> Digest {
        let mut m = plan("forged").manifest;
        m.serial = serial;
        let bytes = m.to_bytes();
        let d = Digest::of(&bytes);
        store.put(&web(), &Key::Manifest(d), &bytes).unwrap();
        let (_, v) = store.current(&web()).unwrap().unwrap();
        store.switch_current(&web(), &d, Some(&v)).unwrap();
        d
    }

    #[test]
    fn a_lost_chroot_numbers_above_the_record_and_above_what_the_host_reports() {
        let t = tempfile::tempdir().unwrap();
        let serials = Serials::new(t.path());
        let n = Numbering {
            record: Some(&serials),
            ..Default::default()
        };
        let store = MemStore::new();
        publish_host(&store, &plan("a"), &n).unwrap();
        publish_host(&store, &plan("b"), &n).unwrap();
        assert_eq!(live_serial(&store), 2);
        lose_versions(&store);
        publish_host(&store, &plan("c"), &n).unwrap();
        assert_eq!(live_serial(&store), 3, "the record survives the chroot");

        // Record lost as well: the host's heartbeat says it applied 7.
        let other = tempfile::tempdir().unwrap();
        let fresh = Serials::new(other.path());
        let n = Numbering {
            record: Some(&fresh),
            ..Default::default()
        };
        lose_versions(&store);
        store.put_log(&web(), "heartbeat.json", &heartbeat(7));
        publish_host(&store, &plan("d"), &n).unwrap();
        assert_eq!(live_serial(&store), 8);
        assert_eq!(fresh.get(&web()).unwrap(), Some(8));
    }

    #[test]
    fn a_confirmed_host_is_not_asked_again_until_current_is_written() {
        let t = tempfile::tempdir().unwrap();
        let serials = Serials::new(t.path());
        let n = Numbering {
            record: Some(&serials),
            ..Default::default()
        };
        let store = MemStore::new();
        publish_host(&store, &plan("a"), &n).unwrap();
        let (live, _) = crate::server::publish::live_version(&store, &web()).unwrap();
        let (_, at) = store.current(&web()).unwrap().unwrap();
        assert!(
            !store.confirmed(&web(), &at),
            "nothing heard from the host yet"
        );
        // A dry run reads the confirming heartbeat but keeps nothing.
        store.put_log(&web(), "heartbeat.json", &running(&live, 1));
        let dry = Numbering { dry_run: true, ..n };
        crate::server::publish::host::decide(&store, &plan("a"), &dry).unwrap();
        assert!(!store.confirmed(&web(), &at));
        let r = publish_host(&store, &plan("a"), &n).unwrap();
        assert_eq!(r.status, Status::Unchanged);
        assert!(store.confirmed(&web(), &at), "the host runs serial 1");

        // A heartbeat that would renumber is no longer read while `current` stays: nothing
        // but a new `current` can bring the host a higher serial.
        store.put_log(&web(), "heartbeat.json", &heartbeat(9));
        let r = publish_host(&store, &plan("a"), &n).unwrap();
        assert_eq!((r.status, live_serial(&store)), (Status::Unchanged, 1));
        // `current` written again (another publisher, a restored store): read, renumbered.
        store.switch_current(&web(), &live, Some(&at)).unwrap();
        let r = publish_host(&store, &plan("a"), &n).unwrap();
        assert_eq!((r.status, live_serial(&store)), (Status::Published, 10));
    }

    #[test]
    fn a_new_version_of_a_confirmed_host_is_numbered_without_its_heartbeat() {
        let t = tempfile::tempdir().unwrap();
        let serials = Serials::new(t.path());
        let n = Numbering {
            record: Some(&serials),
            ..Default::default()
        };
        let store = MemStore::new();
        publish_host(&store, &plan("a"), &n).unwrap();
        let (live, _) = crate::server::publish::live_version(&store, &web()).unwrap();
        store.put_log(&web(), "heartbeat.json", &running(&live, 1));
        publish_host(&store, &plan("a"), &n).unwrap();
        let (_, at) = store.current(&web()).unwrap().unwrap();
        assert!(store.confirmed(&web(), &at));

        // A heartbeat read now would number above 9: it is not read, the record numbers.
        store.put_log(&web(), "heartbeat.json", &heartbeat(9));
        let r = publish_host(&store, &plan("b"), &n).unwrap();
        assert_eq!((r.status, live_serial(&store)), (Status::Published, 2));
        // The new `current` voided the confirmation: the next publish hears the host (here
        // one that refused serial 2 as a replay) and numbers above what it applied.
        let r = publish_host(&store, &plan("b"), &n).unwrap();
        assert_eq!((r.status, live_serial(&store)), (Status::Published, 10));
    }

    #[test]
    fn a_host_that_never_confirmed_its_version_is_heard_on_every_publish() {
        // As after records, manifests and the heartbeat were lost: publish numbered 1 and
        // `current` is this publisher's own write, yet the host that refuses serial 1 as a
        // replay (it applied 4) never confirmed it, so its heartbeat still repairs it.
        let t = tempfile::tempdir().unwrap();
        let serials = Serials::new(t.path());
        let n = Numbering {
            record: Some(&serials),
            ..Default::default()
        };
        let store = MemStore::new();
        publish_host(&store, &plan("a"), &n).unwrap();
        let r = publish_host(&store, &plan("a"), &n).unwrap();
        assert_eq!((r.status, live_serial(&store)), (Status::Unchanged, 1));
        // The host applied serial 4 of a version the lost records numbered.
        let earlier = Digest::of(b"a version the lost records numbered");
        store.put_log(&web(), "heartbeat.json", &running(&earlier, 4));
        let r = publish_host(&store, &plan("a"), &n).unwrap();
        assert_eq!((r.status, live_serial(&store)), (Status::Published, 5));
    }

    #[test]
    fn a_live_version_the_host_outnumbers_is_published_again_with_the_same_content() {
        let store = MemStore::new();
        publish_host(&store, &plan("a"), &Numbering::default()).unwrap();
        store.put_log(&web(), "heartbeat.json", &heartbeat(9));
        let r = publish_host(&store, &plan("a"), &Numbering::default()).unwrap();
        assert_eq!(
            r.status,
            Status::Published,
            "the host would refuse serial 1"
        );
        assert_eq!(live_serial(&store), 10);
    }

    #[test]
    fn an_unverified_serial_is_never_numbered_from_in_a_signing_fleet() {
        let t = tempfile::tempdir().unwrap();
        let key = t.path().join("key");
        crate::protocol::signing::generate(&key, "test").unwrap();
        let signer = crate::protocol::signing::Signer::load(&key).unwrap();
        let serials = Serials::new(t.path());
        let n = Numbering {
            signer: Some(&signer),
            record: Some(&serials),
            floor: None,
            dry_run: false,
            stamping: None,
            versions: None,
        };
        let store = MemStore::new();
        publish_host(&store, &plan("a"), &n).unwrap();
        forge_live(&store, u64::MAX);
        let r = publish_host(&store, &plan("a"), &n).unwrap();
        assert_eq!(r.status, Status::Published);
        assert_eq!(live_serial(&store), 2, "numbered from the signed serial 1");
        assert!(
            r.warnings.iter().any(|w| w.contains("not trusted")
                && w.contains(&u64::MAX.to_string())
                && w.contains("does not verify")),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn an_unsigned_fleet_refuses_a_jump_it_did_not_make_until_given_a_floor() {
        let t = tempfile::tempdir().unwrap();
        let serials = Serials::new(t.path());
        let mut n = Numbering {
            record: Some(&serials),
            ..Default::default()
        };
        let store = MemStore::new();
        publish_host(&store, &plan("a"), &n).unwrap();
        let forged = forge_live(&store, u64::MAX);
        let e = publish_host(&store, &plan("b"), &n)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("did not make that jump") && e.contains("--serial-floor"),
            "{e}"
        );
        assert_eq!(
            crate::server::publish::live_version(&store, &web())
                .unwrap()
                .0,
            forged,
            "a refusal writes nothing"
        );
        n.floor = Some(40);
        publish_host(&store, &plan("b"), &n).unwrap();
        assert_eq!(live_serial(&store), 40);
        // Same content, a higher floor: a new version all the same.
        n.floor = Some(50);
        let r = publish_host(&store, &plan("b"), &n).unwrap();
        assert_eq!((r.status, live_serial(&store)), (Status::Published, 50));
        n.floor = None;
        let r = publish_host(&store, &plan("b"), &n).unwrap();
        assert_eq!(r.status, Status::Unchanged);
    }
}
