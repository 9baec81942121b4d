//! Publishing one host through a `Store`: objects first, then the manifest and its
//! signature, then `current` switched from the version read at the start. Whatever request
//! a publish dies after, `current` names a complete version (the old one or the new one).
//! Old versions beyond the last three, and whatever a killed publish left, are collected
//! afterwards (`collect`). In a batch (the chroot), everything is written for every host
//! before any `current` is switched: [`stage_host`], then [`Ready::go_live`].

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{HostPlan, HostReport, PublishError, Status};
use crate::protocol::layout::{self, Key};
use crate::protocol::manifest::{Digest, Manifest, MAX_MANIFEST_BYTES};
use crate::protocol::HostName;
use crate::server::store::{Store, StoreError, Version};

/// How many versions (manifests and their objects) a host keeps, the live one included.
pub const KEEP_VERSIONS: usize = 3;

/// Reads the live manifest, if any, whole (a format-2 manifest with its trees read). A
/// missing or broken one counts as none: the next publish replaces it.
pub fn live_version(store: &dyn Store, host: &HostName) -> Option<(Digest, Manifest)> {
    let (bytes, _) = store.current(host).ok()??;
    let (digest, mut manifest) = live_manifest(store, host, &bytes)?;
    crate::server::store::trees::expand(store, host, &mut manifest).ok()?;
    Some((digest, manifest))
}

/// The live version's digest, as [`live_version`] finds it, without reading its trees
/// (for reports and lists that name the version only).
pub fn live_digest(store: &dyn Store, host: &HostName) -> Option<Digest> {
    let (bytes, _) = store.current(host).ok()??;
    live_manifest(store, host, &bytes).map(|(d, _)| d)
}

/// [`live_version`] of a chroot's host directory `<root>/<host>` (tests and benchmarks,
/// which know the directory).
pub fn read_current(host_dir: &std::path::Path) -> Option<(Digest, Manifest)> {
    let host = HostName::new(host_dir.file_name()?.to_str()?).ok()?;
    let chroot = crate::protocol::layout::Chroot::new(host_dir.parent()?);
    let store = crate::server::store::ChrootStore::new(chroot, super::Ownership::Leave);
    live_version(&store, &host)
}

/// The manifest `current`'s bytes name, when it is there and whole (format 2's trees
/// unread: deciding whether a version changed compares roots, reading no tree).
fn live_manifest(store: &dyn Store, host: &HostName, current: &[u8]) -> Option<(Digest, Manifest)> {
    let digest = layout::parse_current(std::str::from_utf8(current).ok()?).ok()?;
    let bytes = store
        .get(host, &Key::Manifest(digest), MAX_MANIFEST_BYTES)
        .ok()??;
    if Digest::of(&bytes) != digest {
        return None;
    }
    Some((digest, Manifest::parse(&bytes).ok()?))
}

/// The live version: its digest and manifest.
pub type Live = (Digest, Manifest);

/// `current` as found at the start of a publish: the live version, and the token the switch
/// of `current` must still find (`None`: there was no `current` at all).
#[derive(Debug, Clone)]
pub struct LiveRead {
    pub live: Option<Live>,
    pub token: Option<Version>,
    /// Taken from the store's memory, not read ([`Store::remembered_current`]): good only for
    /// a new version, whose switch fails if `current` moved since (then it is read).
    pub remembered: bool,
}

/// Reads [`LiveRead`].
pub fn read_live(store: &dyn Store, host: &HostName) -> Result<LiveRead, StoreError> {
    Ok(match store.current(host)? {
        Some((bytes, version)) => LiveRead {
            live: live_manifest(store, host, &bytes),
            token: Some(version),
            remembered: false,
        },
        None => LiveRead {
            live: None,
            token: None,
            remembered: false,
        },
    })
}

/// [`read_live`] for a publish of `plan`: when the store remembers `current` and the plan
/// makes a new version of what it names whatever the host runs, the memory stands in for
/// the read (on an object store, one request fewer per changed host).
pub fn read_live_for(store: &dyn Store, plan: &HostPlan) -> Result<LiveRead, StoreError> {
    if let Some((bytes, token)) = store.remembered_current(&plan.host) {
        if let Some(live) = live_manifest(store, &plan.host, &bytes) {
            if new_anyway(&live.1, plan) {
                return Ok(LiveRead {
                    live: Some(live),
                    token: Some(token),
                    remembered: true,
                });
            }
        }
    }
    read_live(store, &plan.host)
}

/// Whether `plan` makes a new version over `live` whichever system either names: only then
/// may deciding rest on a remembered `current` (keeping the live version must rest on
/// `current` as it is now).
fn new_anyway(live: &Manifest, plan: &HostPlan) -> bool {
    plan.keep_live.is_none() && !live.same_content_but_system(&plan.manifest)
}

/// Opens an object's bytes from where the plan found them; a failure to open or read them
/// is flagged in `failed`, so the error names the source file, not the store.
fn opener(
    source: &crate::server::hostfiles::Source,
    failed: Arc<AtomicBool>,
) -> impl Fn() -> io::Result<Box<dyn io::Read>> + Sync + '_ {
    move || -> io::Result<Box<dyn io::Read>> {
        let flag = |e: io::Error| {
            failed.store(true, Ordering::Relaxed);
            e
        };
        let reader = source.open().map_err(flag)?;
        Ok(Box::new(Flagged {
            reader,
            failed: failed.clone(),
        }))
    }
}

/// A source's reader that flags its read errors (see [`opener`]).
struct Flagged {
    reader: Box<dyn io::Read>,
    failed: Arc<AtomicBool>,
}

impl io::Read for Flagged {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf).inspect_err(|_| {
            self.failed.store(true, Ordering::Relaxed);
        })
    }
}

/// What publishing a plan does, decided before anything is written (and all that
/// `publish --dry-run` does).
pub enum Decision {
    /// The live version stays. `sign`: a signing fleet's live manifest still lacks its
    /// signature (a key configured since the last publish), which publish adds in place.
    /// `version` and `serial`: the live version, whose freshness stamp publish renews.
    Keep {
        report: Box<HostReport>,
        sign: Option<Digest>,
        version: Digest,
        serial: u64,
    },
    /// A new version, numbered: what is written, and from which `current`.
    New(Box<NewVersion>),
}

/// A new version, ready to be written.
pub struct NewVersion {
    pub live: Option<Live>,
    token: Option<Version>,
    /// `token` was remembered, not read ([`LiveRead::remembered`]).
    remembered: bool,
    next: super::serial::Next,
    pub manifest: Manifest,
    pub warnings: Vec<String>,
}

/// Decides whether `plan` makes a new version of its host, reading only.
pub fn decide(
    store: &dyn Store,
    plan: &HostPlan,
    numbering: &super::Numbering<'_>,
) -> Result<Decision, PublishError> {
    let host = &plan.host;
    let read = match &plan.live {
        Some(read) => read.clone(),
        None => read_live_for(store, plan)?,
    };
    // The plan may have changed since (format 2's trees are made after delivery read it).
    let read =
        match read.remembered && !read.live.as_ref().is_some_and(|(_, l)| new_anyway(l, plan)) {
            true => read_live(store, host)?,
            false => read,
        };
    let LiveRead {
        live,
        token,
        remembered,
    } = read;
    if let Some(tree) = live.as_ref().and_then(|(_, m)| m.tree.as_ref()) {
        crate::server::store::trees::touch(&tree.root);
    }
    // `--serial-floor` renumbers the live version: it is not kept as it is.
    if let (Some(why), Some((digest, live)), None) = (&plan.keep_live, &live, numbering.floor) {
        let mut live = live.clone();
        crate::server::store::trees::expand(store, host, &mut live)
            .map_err(|e| PublishError::Internal(format!("{host}: the live version: {e}")))?;
        return Ok(Decision::Keep {
            report: Box::new(HostReport {
                host: host.clone(),
                status: Status::Unchanged,
                digest: Some(*digest),
                config_entries: live.config.len(),
                files: live.files.len(),
                objects: live.objects().len(),
                new_objects: 0,
                bytes: 0,
                error: None,
                reason: Some(why.clone()),
                warnings: Vec::new(),
            }),
            sign: None,
            version: *digest,
            serial: live.serial,
        });
    }
    if let Some((digest, live)) = &live {
        if live.same_content(&plan.manifest)
            && super::serial::numbered_last(
                store,
                numbering,
                host,
                digest,
                live.serial,
                token.as_ref(),
            )?
        {
            // The same content as the plan: the plan's counts are the live version's.
            return Ok(Decision::Keep {
                report: Box::new(report_of(
                    plan,
                    &plan.manifest,
                    Status::Unchanged,
                    *digest,
                    0,
                    0,
                )),
                sign: unsigned(store, host, digest, numbering)?,
                version: *digest,
                serial: live.serial,
            });
        }
    }
    // The new version's serial: above every serial the publisher can prove, so hosts order
    // versions without trusting clocks (server::publish::serial).
    let next = super::serial::next(store, host, live.as_ref(), token.as_ref(), numbering)?;
    let mut manifest = plan.manifest.clone();
    manifest.serial = next.serial;
    let mut warnings = next.warnings.clone();
    if let Some((digest, live)) = &live {
        if live.created.system_time() > manifest.created.system_time() {
            warnings.push(format!(
                "{}: this machine's clock ({}) is behind the live version {} ({}); hosts order versions by serial, so serial {} is still newer for them, but check the clock",
                plan.host,
                manifest.created,
                digest.short(),
                live.created,
                manifest.serial
            ));
        }
    }
    if let Some((digest, live)) = live.as_ref().filter(|_| !next.renumber) {
        if live.same_content(&manifest) {
            let sign = unsigned(store, host, digest, numbering)?;
            return Ok(Decision::Keep {
                report: Box::new(HostReport {
                    warnings,
                    ..report_of(plan, &manifest, Status::Unchanged, *digest, 0, 0)
                }),
                sign,
                version: *digest,
                serial: live.serial,
            });
        }
    }
    Ok(Decision::New(Box::new(NewVersion {
        live,
        token,
        remembered,
        next,
        manifest,
        warnings,
    })))
}

/// The live manifest of a signing fleet that still lacks its signature (a key configured
/// since the last publish): publish signs it in place.
fn unsigned(
    store: &dyn Store,
    host: &HostName,
    digest: &Digest,
    numbering: &super::Numbering<'_>,
) -> Result<Option<Digest>, PublishError> {
    Ok(match numbering.signer {
        Some(_) if !store.exists(host, &Key::Signature(*digest))? => Some(*digest),
        _ => None,
    })
}

fn report_of(
    plan: &HostPlan,
    manifest: &Manifest,
    status: Status,
    digest: Digest,
    new_objects: usize,
    bytes: u64,
) -> HostReport {
    HostReport {
        host: plan.host.clone(),
        status,
        digest: Some(digest),
        config_entries: manifest.config.len(),
        files: manifest.files.len(),
        objects: manifest.objects().len(),
        new_objects,
        bytes,
        error: None,
        reason: None,
        warnings: Vec::new(),
    }
}

/// Publishes one host. Returns what happened; errors leave the previous version live.
pub fn publish_host(
    store: &dyn Store,
    plan: &HostPlan,
    numbering: &super::Numbering<'_>,
) -> Result<HostReport, PublishError> {
    let staged = stage_host(store, plan, numbering)?;
    finish(store, plan, numbering, staged)
}

/// Makes a staged host's new version live. When its `current` was remembered and has moved
/// since (another publisher, a restored store), the host is staged again once from
/// `current` as read now, as a publish that began after the move would have.
pub fn finish(
    store: &dyn Store,
    plan: &HostPlan,
    numbering: &super::Numbering<'_>,
    staged: Staged,
) -> Result<HostReport, PublishError> {
    let ready = match staged {
        Staged::Done(report) => return Ok(*report),
        Staged::Ready(ready) => ready,
    };
    let remembered = ready.remembered;
    match ready.go_live(store, numbering) {
        Err(PublishError::Store(StoreError::Raced { .. })) if remembered => {
            tracing::debug!(
                "{}: `current` moved since this publisher wrote it; reading it",
                plan.host
            );
            // Rare: the plan is copied to carry `current` as read now.
            let plan = HostPlan {
                live: Some(read_live(store, &plan.host)?),
                ..plan.clone()
            };
            match stage_host(store, &plan, numbering)? {
                Staged::Done(report) => Ok(*report),
                Staged::Ready(ready) => ready.go_live(store, numbering),
            }
        }
        done => done,
    }
}

/// A host after everything of its new version was written, before `current` names it.
pub enum Staged {
    /// Nothing to switch: the live version stays.
    Done(Box<HostReport>),
    Ready(Box<Ready>),
}

/// A new version written whole, waiting for its `current` to be switched.
pub struct Ready {
    host: HostName,
    digest: Digest,
    token: Option<Version>,
    remembered: bool,
    discard: Vec<Digest>,
    /// What the publish read or wrote of the host's versions, for collecting.
    known: super::collect::Known,
    report: HostReport,
}

impl Ready {
    /// Switches `current` (if it is still what the version was numbered from), then
    /// removes what the new version pushed out of the kept ones, and remembers the kept
    /// ones in the publisher's memo.
    pub fn go_live(
        self,
        store: &dyn Store,
        numbering: &super::Numbering<'_>,
    ) -> Result<HostReport, PublishError> {
        let Ready {
            host,
            digest,
            token,
            remembered: _,
            discard,
            known,
            report,
        } = self;
        if let Err(e) = store.switch_current(&host, &digest, token.as_ref()) {
            if matches!(e, StoreError::Raced { .. }) {
                withdraw(store, &host, &digest);
            }
            return Err(e.into());
        }
        for d in &discard {
            store.delete(&host, &Key::Manifest(*d))?;
        }
        let kept = super::collect::collect_host(store, &host, &digest, &known)?;
        if let Some(versions) = numbering.versions {
            versions.set(&host, kept);
        }
        Ok(report)
    }
}

/// Writes what a new version of the host needs (objects, then its serial record, manifest,
/// signature and stamp), or renews the live one's signature and stamp.
pub fn stage_host(
    store: &dyn Store,
    plan: &HostPlan,
    numbering: &super::Numbering<'_>,
) -> Result<Staged, PublishError> {
    let host = &plan.host;
    let new = match decide(store, plan, numbering)? {
        Decision::Keep {
            report,
            sign,
            version,
            serial,
        } => {
            if let (Some(digest), Some(signer)) = (sign, numbering.signer) {
                let bytes = store
                    .get(host, &Key::Manifest(digest), MAX_MANIFEST_BYTES)?
                    .ok_or_else(|| missing(store, host, &Key::Manifest(digest)))?;
                store.put(
                    host,
                    &Key::Signature(digest),
                    signer.sign(&bytes)?.as_bytes(),
                )?;
            }
            // An unchanged version is still vouched for anew by this publish.
            super::fresh::stamp(
                store,
                host,
                version,
                serial,
                numbering.signer,
                numbering.stamping,
            )?;
            return Ok(Staged::Done(report));
        }
        Decision::New(new) => new,
    };
    let signer = numbering.signer;
    let NewVersion {
        token,
        remembered,
        next,
        manifest,
        warnings,
        ..
    } = *new;
    let manifest = &manifest;
    let objects = manifest.objects();
    if let Some(tree) = &manifest.tree {
        if let Some(trees) = &tree.stored {
            crate::server::store::trees::remember(trees, (&tree.root, &tree.top));
        }
    }

    store.open_host(host)?;

    let mut new_objects = 0;
    let mut bytes = 0;
    let held = store.held_objects(host)?;
    let is_held = |d: &Digest| held.as_ref().is_some_and(|h| h.contains(d));
    for digest in objects.iter().filter(|d| !is_held(d)) {
        let Some(source) = plan.sources.get(digest) else {
            if store.exists(host, &Key::Object(*digest))? {
                continue;
            }
            return Err(PublishError::Internal(format!(
                "no source for object {digest}"
            )));
        };
        let failed = Arc::new(AtomicBool::new(false));
        let open = opener(source, failed.clone());
        let placed = store.put_object(host, digest, &open).map_err(|e| match e {
            StoreError::DigestMismatch(_) => {
                PublishError::ChangedWhilePublishing(source.describe())
            }
            StoreError::Io { source: io, .. } if failed.load(Ordering::Relaxed) => {
                PublishError::Io {
                    path: source.describe(),
                    source: io,
                }
            }
            e => e.into(),
        })?;
        if let Some(sent) = placed {
            bytes += sent;
            new_objects += 1;
        }
    }

    let manifest_bytes = manifest.to_bytes();
    let digest = Digest::of(&manifest_bytes);
    let mut known = next.read;
    if let Some(held) = held {
        known.held(held, &objects);
    }
    known.uses(digest, objects, manifest.tree.is_some());
    known.keep(digest, super::versions::Summary::of(manifest));
    // Recorded before any manifest carries it: the record is never behind the chroot.
    super::serial::record(numbering, host, manifest.serial)?;
    store.put(host, &Key::Manifest(digest), &manifest_bytes)?;
    // The signature lands before `current` names the manifest: a host never sees an
    // unsigned live version from a signing fleet.
    if let Some(signer) = signer {
        store.put(
            host,
            &Key::Signature(digest),
            signer.sign(&manifest_bytes)?.as_bytes(),
        )?;
    }
    // The stamp too: keyed by the digest, it is there when `current` names the version.
    super::fresh::stamp(
        store,
        host,
        digest,
        manifest.serial,
        signer,
        numbering.stamping,
    )?;
    bytes += manifest_bytes.len() as u64;
    Ok(Staged::Ready(Box::new(Ready {
        host: host.clone(),
        digest,
        token,
        remembered,
        discard: next.discard,
        known,
        report: HostReport {
            warnings,
            ..report_of(
                plan,
                manifest,
                Status::Published,
                digest,
                new_objects,
                bytes,
            )
        },
    })))
}

/// After a lost race, removes the manifest and signature this publish wrote, unless the
/// winner made the very same version live: the winner numbered its version from the same
/// kept versions, so leaving ours would put two digests under one serial.
fn withdraw(store: &dyn Store, host: &HostName, ours: &Digest) {
    let live = store
        .current(host)
        .ok()
        .flatten()
        .and_then(|(bytes, _)| layout::parse_current(&String::from_utf8_lossy(&bytes)).ok());
    if live.as_ref() == Some(ours) {
        return;
    }
    for key in [Key::Signature(*ours), Key::Manifest(*ours)] {
        if let Err(e) = store.delete(host, &key) {
            tracing::warn!(
                "{host}: another publish won, and withdrawing this run's version failed: {e}"
            );
        }
    }
}

fn missing(store: &dyn Store, host: &HostName, key: &Key) -> StoreError {
    StoreError::Io {
        at: store.locate(host, key),
        source: io::ErrorKind::NotFound.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::MemStore;

    fn plan(text: &str) -> HostPlan {
        crate::server::publish::fixture::plan(
            "alpha",
            &[("configuration.nix", text)],
            1_700_000_000,
        )
    }

    #[test]
    fn a_remembered_current_that_moved_is_read_and_the_host_still_published() {
        let store = MemStore::remembering();
        let n = super::super::Numbering::default();
        let alpha = HostName::new("alpha").unwrap();
        let a = publish_host(&store, &plan("a"), &n)
            .unwrap()
            .digest
            .unwrap();
        let b = publish_host(&store, &plan("b"), &n)
            .unwrap()
            .digest
            .unwrap();

        // Another publisher rolls the host back to `a` behind this store's memory.
        store.switch_elsewhere(&alpha, &a);
        // A new version: staged on the remembered `b`, its switch lost, staged again from
        // `current` as it is, and live.
        let read = read_live_for(&store, &plan("c")).unwrap();
        assert!(read.remembered, "a new version rests on the memory");
        assert_eq!(read.live.map(|(d, _)| d), Some(b));
        let c = publish_host(&store, &plan("c"), &n).unwrap();
        let (live, manifest) = live_version(&store, &alpha).unwrap();
        assert_eq!((c.status, c.digest), (Status::Published, Some(live)));
        assert_eq!(manifest.serial, 3);

        // The plan is what the memory names live, but `current` moved: keeping rests on a
        // read, which finds `a`, so `c` is published again.
        store.switch_elsewhere(&alpha, &a);
        let read = read_live_for(&store, &plan("c")).unwrap();
        assert!(
            !read.remembered,
            "keeping the live version is never remembered"
        );
        let again = publish_host(&store, &plan("c"), &n).unwrap();
        assert_eq!(again.status, Status::Published);
        assert_eq!(live_version(&store, &alpha).unwrap().1.serial, 4);
    }

    #[test]
    fn a_lost_race_withdraws_its_own_version_but_never_the_live_one() {
        let store = MemStore::new();
        let host = HostName::new("alpha").unwrap();
        store.open_host(&host).unwrap();
        let (winner, loser) = (Digest::of(b"winner"), Digest::of(b"loser"));
        for d in [winner, loser] {
            store.put(&host, &Key::Manifest(d), b"{}").unwrap();
            store.put(&host, &Key::Signature(d), b"sig").unwrap();
        }
        store.switch_current(&host, &winner, None).unwrap();
        withdraw(&store, &host, &loser);
        assert!(!store.exists(&host, &Key::Manifest(loser)).unwrap());
        assert!(!store.exists(&host, &Key::Signature(loser)).unwrap());
        // The winner made the very same version live: nothing is withdrawn.
        withdraw(&store, &host, &winner);
        assert!(store.exists(&host, &Key::Manifest(winner)).unwrap());
        assert!(store.exists(&host, &Key::Signature(winner)).unwrap());
    }
}
