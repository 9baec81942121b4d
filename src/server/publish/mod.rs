//! `bento publish`: from discovered hosts to live versions in the chroot. Everything that
//! can be refused (names, links, files.toml, secrets, unknown `--host`) is refused before the
//! first write to that host; a host whose own directory or secrets are at fault fails alone,
//! and each host is published on its own, so one failing host never stops the rest.

pub mod changes;
mod collect;
mod commit;
mod dry;
#[cfg(test)]
pub(crate) mod fixture;
mod fresh;
mod hook;
mod host;
#[cfg(test)]
mod killed;
mod packs;
mod plaintext;
mod plan;
mod refusals;
mod serial;
mod verify;
mod versions;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rayon::prelude::*;
use serde::Serialize;

pub use changes::Changes;
pub use collect::{collect_host, collect_pool};
pub use commit::{dirty_warning, source_commit, Commit};
pub use fresh::{refresh, window as freshness_window, Refreshed, Stamping};
pub use hook::Delivery;
pub use host::{
    live_digest, live_version, publish_host, read_current, read_live_for, stage_host, Staged,
    KEEP_VERSIONS,
};
pub use plan::{materialize_config, plan};
pub use refusals::undefined_error;
use refusals::{host_error, no_entry_warning, refuse_private_keys, unknown_host};
pub use serial::Numbering;
pub use verify::{verify_host, VerifyError};

use crate::nix::StorePath;
use crate::protocol::layout::Chroot;
use crate::protocol::manifest::{Digest, Manifest};
pub use crate::server::chroot::Ownership;
use crate::server::chroot::{self, ChrootError};
use crate::server::fleet::{FlakeHosts, Fleet, HostName};
use crate::server::hostfiles::{self, HostFilesError};
use crate::server::store::{ChrootStore, Store, StoreError, StoreLock};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Chroot(#[from] ChrootError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} changed while it was being published; run publish again")]
    ChangedWhilePublishing(PathBuf),
    #[error("chroot path {path}: {problem}; OpenSSH refuses a ChrootDirectory whose every component is not root-owned and unwritable by group and others")]
    UnsafeChrootPath { path: PathBuf, problem: String },
    #[error("{0}: this name is reserved for the settings bento generates from bento.toml; rename the file")]
    Reserved(PathBuf),
    #[error("no host named {0} in the fleet")]
    UnknownHost(HostName),
    #[error("no host named {host} among the hosts bento could list, and this directory may define it: {broken}")]
    UnknownHostBroken { host: HostName, broken: String },
    #[error("signing key {0} is inside the fleet repo; keep it out (it would be committed and could be published)")]
    KeyInRepo(PathBuf),
    #[error(transparent)]
    Signing(#[from] crate::protocol::signing::SigningError),
    #[error(transparent)]
    HostFiles(#[from] HostFilesError),
    #[error(transparent)]
    Discover(#[from] crate::server::fleet::DiscoverError),
    #[error("{0}: holds a private key, and the configuration tree is copied into the world-readable Nix store; move it under files/ (installed verbatim, never in the store)")]
    PrivateKeyInConfig(PathBuf),
    #[error(transparent)]
    Secrets(#[from] crate::server::secrets::SecretsError),
    #[error("{host}: {detail}; if the server was restored or lost its state, find the serial the host applied (the agent's refusal names it; `bento status --json` shows its \"serial\") and run `bento publish --host {host} --serial-floor N` with N above it (docs/operators.md, \"When the server was restored\")")]
    SerialJump { host: HostName, detail: String },
    #[error("[server] freshness is set but [server] signing_key is not: freshness stamps are signed with the fleet key (`bento keygen`), so set signing_key too")]
    FreshnessUnsigned,
    #[error("internal error: {0}")]
    Internal(String),
}

/// One host, ready to publish.
#[derive(Debug, Clone)]
pub struct HostPlan {
    pub host: HostName,
    pub manifest: Manifest,
    pub sources: hostfiles::Sources,
    /// Set by delivery when this new tree changes nothing the host would run (`same
    /// system`): the live version stays, once the tree passed every refusal.
    pub keep_live: Option<String>,
    /// `current` and the live manifest as read at the start of this run (by delivery), so
    /// deciding does not read them again; `None`: not read yet.
    pub live: Option<host::LiveRead>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Published,
    Unchanged,
    Failed,
}

/// What publishing one host did; one line of output, one JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub host: HostName,
    pub status: Status,
    /// The live version after this run (absent when a first publish failed).
    pub digest: Option<Digest>,
    pub config_entries: usize,
    pub files: usize,
    pub objects: usize,
    pub new_objects: usize,
    /// Bytes written into the chroot and pool by this run.
    pub bytes: u64,
    pub error: Option<String>,
    /// Why an `unchanged` host is, when its configuration changed: `same system` (its
    /// evaluated system, files and settings are those of the live version).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What publish went on with but the user should fix, each saying what to do (a
    /// clock behind the live version's, a file outside `files/<host>/`, …).
    pub warnings: Vec<String>,
}

impl HostReport {
    pub fn changed(&self) -> bool {
        self.status == Status::Published
    }

    /// A host that failed before it had a plan; its live version stays.
    pub fn failed(store: &dyn Store, host: &HostName, error: String) -> Self {
        Self {
            host: host.clone(),
            status: Status::Failed,
            digest: live_digest(store, host),
            config_entries: 0,
            files: 0,
            objects: 0,
            new_objects: 0,
            bytes: 0,
            error: Some(error),
            reason: None,
            warnings: Vec::new(),
        }
    }
}

/// What one publish run did: a report per host, and the flake directories whose hosts
/// could not be listed (none of their hosts is published; which they are is unknown).
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub reports: Vec<HostReport>,
    pub broken: Vec<crate::server::fleet::BrokenDir>,
    /// With `dry_run`: what a new version would change, per planned host (whether or not
    /// it would get one: `same system` keeps a changed tree's live version).
    pub changes: BTreeMap<HostName, Changes>,
}

/// How many hosts are published at once. Publishing a host waits on the disk (each version
/// is made durable before `current` names it) or on the network (an object store) far more
/// than it computes; with many hosts in flight the kernel commits their syncs together and
/// the store's round trips overlap (measured: 200 hosts' one-file change 6.8 s with 2, 2 s
/// with 32).
const HOSTS_IN_FLIGHT: usize = 32;

fn in_flight() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(HOSTS_IN_FLIGHT)
        .thread_name(|i| format!("publish-{i}"))
        .build()
        .expect("a thread pool")
}

/// Checks every existing component of the chroot root: sshd refuses the chroot otherwise.
pub fn check_chroot_path(root: &Path) -> Result<(), PublishError> {
    match chroot::unsafe_component(root) {
        Ok(None) => Ok(()),
        Ok(Some((path, problem))) => Err(PublishError::UnsafeChrootPath { path, problem }),
        Err(source) => Err(PublishError::Io {
            path: root.to_owned(),
            source,
        }),
    }
}

/// Creates the chroot root and its state directory, and takes the publish lock.
pub fn open_chroot(
    chroot: &Chroot,
    ownership: &Ownership,
    on_wait: impl FnOnce(),
) -> Result<StoreLock, PublishError> {
    open_store(
        &ChrootStore::new(chroot.clone(), ownership.clone()),
        on_wait,
    )
}

/// Takes the store's publish lock (readying the store for writing).
pub fn open_store(store: &dyn Store, on_wait: impl FnOnce()) -> Result<StoreLock, PublishError> {
    Ok(store.lock(Box::new(on_wait))?)
}

/// Options of one publish run.
pub struct Options<'a> {
    /// Where the hosts' versions go.
    pub store: &'a dyn Store,
    /// The publisher's own state (hash and flake caches, sealed secrets, the binary caches
    /// of `server::delivery`): the chroot's `.bento/`.
    pub chroot: Chroot,
    /// Only these hosts (all when empty).
    pub only: Vec<HostName>,
    /// Expected systems from `bento build`, recorded in the manifests (`publish --build`).
    pub systems: BTreeMap<HostName, StorePath>,
    pub now: SystemTime,
    /// Signs every manifest (`[server] signing_key`).
    pub signer: Option<&'a crate::protocol::signing::Signer>,
    /// Called when the publish lock is busy and the run waits for it.
    pub on_wait: Box<dyn FnOnce() + 'a>,
    /// Called as each host finishes (progress), from any thread.
    pub on_host: &'a (dyn Fn(&HostReport) + Sync),
    /// Issue #12: evaluation gate, systems and binary caches (`server::delivery`).
    pub delivery: Option<&'a dyn Delivery>,
    /// `--serial-floor N`: new versions get at least serial N (server::publish::serial).
    pub serial_floor: Option<u64>,
    /// `publish --dry-run`: decide each host as publish would, write nothing (no lock, no
    /// cache, no record, nothing in the store); the reports say what would happen.
    pub dry_run: bool,
    /// `[server] freshness`: how long the stamps of live versions vouch for them.
    pub freshness: Option<std::time::Duration>,
    /// The serial records (`records::Serials` of the chroot's records): each is read once,
    /// and the caller reads what the run raised without reading it again.
    pub serials: &'a crate::server::records::Serials,
}

/// Loads the fleet's signing key, refusing one kept inside the fleet repo.
pub fn load_signer(
    fleet: &Fleet,
) -> Result<Option<crate::protocol::signing::Signer>, PublishError> {
    let Some(path) = &fleet.config.server.signing_key else {
        return Ok(None);
    };
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
    if abs.starts_with(&fleet.root) {
        return Err(PublishError::KeyInRepo(path.clone()));
    }
    Ok(Some(crate::protocol::signing::Signer::load(path)?))
}

/// Publishes the fleet. Returns one report per host, in host order, and the flake
/// directories whose hosts could not be listed; per-host failures (a `[hosts.NAME]` without
/// a directory among them) are in the reports, errors that stop the whole run are `Err`.
pub fn run(
    fleet: &Fleet,
    flakes: &dyn FlakeHosts,
    scanner: &crate::server::snapshot::Scanner,
    opts: Options<'_>,
) -> Result<Published, PublishError> {
    let mut found = crate::server::fleet::discover_each(fleet, scanner, flakes)?;
    // A host whose directory could not be read fails alone, as a report naming the fix.
    let unreadable: Vec<HostReport> = std::mem::take(&mut found.failed)
        .into_iter()
        .filter(|(h, _)| opts.only.is_empty() || opts.only.contains(h))
        .map(|(h, e)| {
            let error = format!(
                "{e}; fix it (replace the link with the file, or keep what it points to inside the fleet repo), then `bento publish --host {h}`"
            );
            HostReport::failed(opts.store, &h, error)
        })
        .collect();
    let only: Vec<HostName> = opts
        .only
        .iter()
        .filter(|h| !unreadable.iter().any(|r| &r.host == *h))
        .cloned()
        .collect();
    if !opts.only.is_empty() && only.is_empty() {
        return Ok(Published {
            reports: unreadable,
            broken: found.broken,
            changes: BTreeMap::new(),
        });
    }
    // A `[hosts.NAME]` no directory defines fails alone, as a report.
    let chosen = found.choose(&only);
    let broken = found.broken;
    let (selected, wanted_undefined) = chosen.map_err(|host| unknown_host(host, &broken))?;
    let undefined: Vec<HostReport> = wanted_undefined
        .iter()
        .map(|h| HostReport::failed(opts.store, h, undefined_error(h, &broken)))
        .collect();
    // Milliseconds: hosts refuse a manifest older than the one they applied, and two
    // publishes within a second must still be told apart.
    let created = crate::protocol::Timestamp::millis(opts.now);
    let commit = source_commit(&fleet.root);
    let plans = plan(
        &fleet.config,
        &selected,
        &created,
        commit.as_ref(),
        &opts.systems,
    )?;

    let _lock = match opts.dry_run {
        true => None,
        false => Some(open_store(opts.store, opts.on_wait)?),
    };
    // Secrets: mark `.age` entries, encrypt plaintext ones per [secrets] (under the lock:
    // it keeps a ciphertext cache in the chroot's state directory).
    let mut plans = plans;
    let sealable = plans.iter_mut().map(|p| crate::server::secrets::Sealable {
        manifest: &mut p.manifest,
        sources: &mut p.sources,
    });
    let writes = match opts.dry_run {
        true => crate::server::secrets::Writes::None,
        false => crate::server::secrets::Writes::Keep,
    };
    let unsealed = crate::server::secrets::seal_as(&fleet.config, &opts.chroot, sealable, writes)?;
    let (plans, unsealed): (Vec<HostPlan>, Vec<HostReport>) = if unsealed.is_empty() {
        (plans, Vec::new())
    } else {
        let failed: BTreeMap<HostName, String> = unsealed
            .into_iter()
            .map(|(h, e)| (h, e.to_string()))
            .collect();
        let reports = failed
            .iter()
            .map(|(h, e)| HostReport::failed(opts.store, h, e.clone()))
            .collect();
        let plans = plans
            .into_iter()
            .filter(|p| !failed.contains_key(&p.host))
            .collect();
        (plans, reports)
    };
    // Issue #12 hook: hosts that fail delivery (evaluation, server build, cache) are held back.
    // On a store that batches (the chroot), every write of the run waits for one commit
    // before any `current` is switched (sys::batch): a sync of the filesystem for all
    // hosts instead of fsyncs per file. Elsewhere each host goes live as soon as it is
    // written, its serial record synced first.
    let records = crate::server::records::dir(&opts.chroot);
    let batch = Arc::new(crate::sys::batch::Batch::new(vec![
        opts.chroot.root.clone(),
        records.clone(),
    ]));
    let batched = !opts.dry_run && opts.store.join_batch(batch.clone());
    let serials = match batched {
        true => opts.serials.clone().in_batch(batch.clone()),
        false => opts.serials.clone(),
    };
    let versions_path = opts.chroot.state_dir().join(versions::MEMO);
    let versions = versions::Versions::load(&versions_path);
    let numbering = Numbering {
        signer: opts.signer,
        record: Some(&serials),
        floor: opts.serial_floor,
        dry_run: opts.dry_run,
        stamping: opts.freshness.map(|window| Stamping {
            window,
            now: opts.now,
        }),
        versions: Some(&versions),
    };
    let (plans, mut held_back) = match opts.delivery {
        Some(d) => d.before(opts.store, &opts.chroot, plans),
        None => (plans, Vec::new()),
    };
    // What the kept versions' trees point at, as the last run saved it.
    let edges = opts
        .chroot
        .state_dir()
        .join(crate::server::store::trees::EDGES);
    crate::server::store::trees::load_edges(&edges);
    let packer = (fleet.config.server.format == crate::protocol::manifest::FORMAT_TREES)
        .then(|| packs::Packer::load(opts.chroot.state_dir().join(packs::MEMO)));
    let plans = match &packer {
        Some(packer) => {
            let (plans, failed) = packs::pack_all(packer, plans, |h, e| {
                HostReport::failed(opts.store, h, host_error(&fleet.config, h, e))
            });
            held_back.extend(failed);
            plans
        }
        None => plans,
    };
    // The delivery hook may hold plans back, so find each plan's host directory by name.
    let dirs: BTreeMap<&HostName, &Path> = selected
        .iter()
        .map(|s| (&s.name, s.dir.as_path()))
        .collect();
    let failed = |p: &HostPlan, e: PublishError| HostReport {
        host: p.host.clone(),
        status: Status::Failed,
        digest: live_digest(opts.store, &p.host),
        config_entries: p.manifest.config.len(),
        files: p.manifest.files.len(),
        objects: p.manifest.objects().len(),
        new_objects: 0,
        bytes: 0,
        error: Some(host_error(&fleet.config, &p.host, e)),
        reason: None,
        warnings: Vec::new(),
    };
    let stage = |p: &HostPlan| {
        refuse_private_keys(scanner, p, dirs[&p.host]).and_then(|()| match opts.dry_run {
            true => dry::report(opts.store, p, &numbering).map(|r| Staged::Done(Box::new(r))),
            false => stage_host(opts.store, p, &numbering),
        })
    };
    let finish = |p: &HostPlan, staged: Result<Staged, PublishError>| {
        let r = match staged {
            Ok(staged) => {
                host::finish(opts.store, p, &numbering, staged).unwrap_or_else(|e| failed(p, e))
            }
            Err(e) => failed(p, e),
        };
        (opts.on_host)(&r);
        r
    };
    let pool = in_flight();
    let make_durable = || {
        pool.install(|| batch.commit())
            .map_err(|e| PublishError::Io {
                path: e.at,
                source: e.source,
            })
    };
    let mut reports: Vec<HostReport> = match batched {
        // Every host's new version written, then made durable at once, then switched.
        true => {
            let staged: Vec<_> = pool.install(|| plans.par_iter().map(|p| (p, stage(p))).collect());
            make_durable()?;
            pool.install(|| staged.into_par_iter().map(|(p, s)| finish(p, s)).collect())
        }
        false => pool.install(|| plans.par_iter().map(|p| finish(p, stage(p))).collect()),
    };
    let changes = match opts.dry_run {
        true => dry::changes(opts.store, &plans),
        false => BTreeMap::new(),
    };
    if reports.iter().any(HostReport::changed) && !opts.dry_run {
        collect_pool(opts.store)?;
    }
    // Issue #12 hook: cache entries go with the manifests that needed them.
    if let Some(d) = opts.delivery.filter(|_| !opts.dry_run) {
        d.after(opts.store, &opts.chroot)?;
    }
    if batched {
        // The switches, and what the hook wrote, durable before the run says it is done.
        make_durable()?;
    }
    reports.extend(held_back);
    reports.extend(unsealed);
    reports.extend(unreadable);
    reports.extend(undefined);
    reports.sort_by(|a, b| a.host.cmp(&b.host));
    let warnings: BTreeMap<&HostName, &[String]> = selected
        .iter()
        .map(|s| (&s.name, s.warnings.as_slice()))
        .collect();
    for r in &mut reports {
        r.warnings.extend(
            warnings
                .get(&r.host)
                .into_iter()
                .flat_map(|w| w.iter().cloned()),
        );
        if r.status != Status::Failed && !fleet.config.hosts.contains_key(&r.host) {
            r.warnings
                .push(no_entry_warning(&r.host, dirs.get(&r.host).copied()));
        }
        if let Some(c) = commit.as_ref().filter(|c| c.dirty && r.changed()) {
            r.warnings.push(dirty_warning(c));
        }
        if fleet.config.secrets.encrypt != crate::server::secrets::EncryptMode::Off
            && r.status != Status::Failed
        {
            r.warnings.extend(plaintext::kept(opts.store, &r.host));
        }
    }
    if opts.dry_run {
        return Ok(Published {
            reports,
            broken,
            changes,
        });
    }
    // Caches are written under the lock, so two runs never interleave their writes.
    if let Some(packer) = &packer {
        let path = opts.chroot.state_dir().join(packs::MEMO);
        packer
            .save(opts.only.is_empty())
            .map_err(|source| PublishError::Io { path, source })?;
    }
    // The kept versions' roots stay in the edges saved next, so collecting them walks no
    // tree; a complete run forgets hosts no longer in the fleet.
    let fleet_hosts: Option<std::collections::BTreeSet<&HostName>> =
        opts.only.is_empty().then(|| {
            // Every host of the fleet has a report.
            reports.iter().map(|r| &r.host).collect()
        });
    versions
        .save(&versions_path, fleet_hosts.as_ref())
        .map_err(|source| PublishError::Io {
            path: versions_path.clone(),
            source,
        })?;
    versions.touch_roots();
    crate::server::store::trees::save_edges(&edges, opts.only.is_empty()).map_err(|source| {
        PublishError::Io {
            path: edges,
            source,
        }
    })?;
    if scanner.cache().is_dirty() {
        scanner.cache().prune_unseen();
        let path = opts.chroot.hash_cache_path();
        crate::sys::atomic::write_file(&path, &scanner.cache().to_bytes(), 0o600)
            .map_err(|source| PublishError::Io { path, source })?;
        // Earlier bentos kept it as JSON under another name: now only stale bytes.
        let _ = std::fs::remove_file(opts.chroot.state_dir().join("hash-cache.json"));
    }
    flakes.save().map_err(|source| PublishError::Io {
        path: opts.chroot.flake_cache_path(),
        source,
    })?;
    opts.store.end_clean()?;
    // Freed beside the run's reporting, not before it. The scans are the scanner's, freed
    // with it.
    crate::sys::drop_aside(plans);
    Ok(Published {
        reports,
        broken,
        changes,
    })
}
