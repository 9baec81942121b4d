//! What `bento publish` does between planning and writing (issue #12; docs/delivery.md),
//! through the `publish::Delivery` hook, under the publish lock and on the exact plans:
//!
//! - **evaluation gate**: a `build_on = "host"` host whose content changed is instantiated
//!   (not built) first; one that does not evaluate is held back, its error naming the fleet
//!   repo's file and line;
//! - **same system**: a flake host whose configuration tree changed (a flake directory is
//!   copied whole, for each of its hosts) but whose evaluated `.drv`, files and settings equal the live
//!   version's keeps its live version (`unchanged`, reason `same system`), once the
//!   tree passed publish's refusals (`HostPlan::keep_live`);
//! - **no churn**: a host's `system` is settled against its live manifest, so publishing the
//!   same tree with and without `--build` gives no host a new version (`settle_system`);
//! - **prebuilt delivery**: a `build_on = "server"` host's system is built here and its
//!   closure exported into the publisher's pool and put into the host's `cache/` through
//!   the `Store` (`cache`) before its manifest goes live.

pub mod cache;
pub mod leak;

use std::path::PathBuf;
use std::time::SystemTime;

use rayon::prelude::*;

use crate::nix::{Nix, StorePath};
use crate::protocol::layout::Chroot;
use crate::protocol::manifest::{Build, Manifest};
use crate::server::build::record::{self, BuildRecord};
use crate::server::eval;
use crate::server::fleet::{BuildOn, Fleet};
use crate::server::publish::{live_digest, HostPlan, HostReport, PublishError, Status};
use crate::server::records;
use crate::server::store::Store;

pub use cache::{CacheError, CacheKey};

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("cache key {0} is inside the fleet repo; keep it out (it would be committed and could be published)")]
    KeyInRepo(PathBuf),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Leak(#[from] leak::LeakError),
}

/// The system a new manifest should name, given the live one (no churn).
///
/// For `build_on = "host"` the version's identity is its content (`build`, `config`,
/// `files`); `system` is the server's expectation. When the content is unchanged, a publish
/// that did not build keeps the live `system`, and one that built keeps a live `null` (the
/// build record still tells `bento status` what to expect); only a *different* built system
/// (e.g. a classic host whose server-side nixpkgs moved) makes a new version. For
/// `build_on = "server"` the system is what the host runs, so it is always the new one.
pub fn settle_system(
    build_on: BuildOn,
    live: Option<&Manifest>,
    new: &Manifest,
) -> Option<StorePath> {
    let Some(live) = live.filter(|l| same_except_system(l, new)) else {
        return new.system.clone();
    };
    match (build_on, &new.system, &live.system) {
        (BuildOn::Server, new, _) => new.clone(),
        (BuildOn::Host, None, kept) => kept.clone(),
        (BuildOn::Host, Some(_), None) => None,
        (BuildOn::Host, Some(built), Some(_)) => Some(built.clone()),
    }
}

/// Equal content, whatever `system` (and `created`, `source_commit`) say.
pub fn same_except_system(live: &Manifest, new: &Manifest) -> bool {
    live.same_content_but_system(new)
}

/// The `reason` of a host kept at its live version because what it would run is the same.
pub const SAME_SYSTEM: &str = "same system";

/// Equal files and settings (`bento-host.json`), whatever the rest of the configuration
/// tree says: what, besides the evaluated system, a host would run differently.
pub fn same_but_tree(live: &Manifest, new: &Manifest) -> bool {
    let settings = |m: &Manifest| {
        m.config
            .iter()
            .find(|e| e.path().as_str() == crate::protocol::settings::FILE)
            .cloned()
    };
    live.format == new.format
        && live.host == new.host
        && live.build == new.build
        && live.files == new.files
        && settings(live) == settings(new)
}

/// The delivery work of one publish run.
pub struct FleetDelivery<'a> {
    pub fleet: &'a Fleet,
    pub nix: Nix,
    /// The evaluation gate (`--no-eval` turns it off).
    pub eval: bool,
    /// Evaluations and server builds at once.
    pub jobs: usize,
    pub now: SystemTime,
    /// `[server] cache_key`, loaded.
    pub key: Option<CacheKey>,
    /// Looks for the fleet's keys in what evaluations and builds put in the store.
    pub guard: leak::Guard,
    /// `publish --dry-run`: evaluate, never build, record or fill a cache (a server-built
    /// host's system is the output its derivation names).
    pub dry_run: bool,
}

impl<'a> FleetDelivery<'a> {
    /// Loads `[server] cache_key` (refusing one inside the fleet repo).
    pub fn new(
        fleet: &'a Fleet,
        nix: Nix,
        eval: bool,
        jobs: usize,
        now: SystemTime,
    ) -> Result<Self, DeliveryError> {
        let key = match &fleet.config.server.cache_key {
            Some(path) => {
                let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
                if abs.starts_with(&fleet.root) {
                    return Err(DeliveryError::KeyInRepo(path.clone()));
                }
                Some(CacheKey::load(path)?)
            }
            None => None,
        };
        let mut keys: Vec<&std::path::Path> = Vec::new();
        keys.extend(fleet.config.server.signing_key.as_deref());
        keys.extend(key.as_ref().map(|k| k.path.as_path()));
        let guard = leak::Guard::new(leak::Needles::from_files(&keys)?);
        Ok(Self {
            fleet,
            nix,
            eval,
            jobs,
            now,
            key,
            guard,
            dry_run: false,
        })
    }

    /// The same work for `publish --dry-run`: nothing is built, recorded or exported.
    pub fn dry(self) -> Self {
        Self {
            dry_run: true,
            ..self
        }
    }

    /// Refuses the host when the store paths its evaluation or build made (`roots` and
    /// their closures) hold a fleet key, and deletes those paths from the store.
    fn refuse_leaks(
        &self,
        store: &dyn Store,
        plan: &HostPlan,
        roots: &[&StorePath],
    ) -> Result<(), Box<HostReport>> {
        let message = match self.guard.leaking(&self.nix, roots) {
            Ok(found) if found.is_empty() => return Ok(()),
            Ok(found) => {
                leak::purge(&self.nix, &found);
                format!(
                    "refused: its evaluation put the fleet's signing or cache key into the Nix store ({}); the configuration reads a key file (deleted those paths where nothing else keeps them)",
                    found.join(", ")
                )
            }
            Err(e) => format!("cannot check its store paths for the fleet's keys: {e}"),
        };
        tracing::error!("{}: {message}", plan.host);
        Err(Box::new(Self::failed(store, plan, message)))
    }

    /// The derivation a system was built from, when the store still knows it.
    fn deriver(&self, system: &StorePath) -> Option<StorePath> {
        let out = self
            .nix
            .run("nix-store", &["--query", "--deriver", system.as_str()])
            .ok()?;
        let text = out.stdout_text();
        let drv = StorePath::new(text.trim()).ok()?;
        std::path::Path::new(drv.as_str()).exists().then_some(drv)
    }

    fn failed(store: &dyn Store, plan: &HostPlan, error: String) -> HostReport {
        HostReport {
            host: plan.host.clone(),
            status: Status::Failed,
            digest: live_digest(store, &plan.host),
            config_entries: plan.manifest.config.len(),
            files: plan.manifest.files.len(),
            objects: plan.manifest.objects().len(),
            new_objects: 0,
            bytes: 0,
            error: Some(error),
            reason: None,
            warnings: Vec::new(),
        }
    }

    /// Gate, build and settle one host; `Ok((plan, needs_cache))`.
    fn prepare(
        &self,
        store: &dyn Store,
        chroot: &Chroot,
        mut plan: HostPlan,
    ) -> Result<(HostPlan, bool), Box<HostReport>> {
        // Read once for the run, its trees unread (comparing contents compares roots; the
        // trees are read only where files are compared, below): deciding takes it from the
        // plan (and, when it could not be read, reads it again and says why).
        let read = crate::server::publish::read_live_for(store, &plan).ok();
        let live = read
            .as_ref()
            .and_then(|r| r.live.as_ref())
            .map(|(_, m)| m.clone());
        plan.live = read;
        let build_on = self.fleet.config.build_on(&plan.host);
        let fail = |plan: &HostPlan, what: &str, f: eval::EvalFailure| {
            tracing::warn!("{}: {what}: {}\n{}", plan.host, f.message, f.log_tail);
            Box::new(Self::failed(store, plan, format!("{what}: {}", f.message)))
        };
        match build_on {
            BuildOn::Host => {
                let changed = live
                    .as_ref()
                    .is_none_or(|l| !same_except_system(l, &plan.manifest));
                // A system built by `--build` has been evaluated already.
                if self.eval && changed && plan.manifest.system.is_none() {
                    let drv = eval::evaluate(&self.nix, &plan, &self.fleet.root)
                        .map_err(|f| fail(&plan, "does not evaluate", f))?;
                    self.refuse_leaks(store, &plan, &[&drv])?;
                    let mut whole = live.clone();
                    if let Some(m) = whole.as_mut() {
                        if crate::server::store::trees::expand(store, &plan.host, m).is_err() {
                            whole = None;
                        }
                    }
                    if self.same_system(chroot, whole.as_ref(), &plan, &drv) {
                        plan.keep_live = Some(SAME_SYSTEM.to_owned());
                    }
                }
            }
            BuildOn::Server => {
                if self.key.is_none() {
                    return Err(Box::new(Self::failed(store, &plan, "build_on = \"server\" needs [server] cache_key in bento.toml (a key from `nix key generate-secret`)".into())));
                }
                if plan.manifest.system.is_none() && self.dry_run {
                    let drv = eval::evaluate(&self.nix, &plan, &self.fleet.root)
                        .map_err(|f| fail(&plan, "does not evaluate", f))?;
                    plan.manifest.system = crate::server::preview::output_of(&self.nix, &drv);
                } else if plan.manifest.system.is_none() {
                    let system = eval::build(&self.nix, &plan, &self.fleet.root)
                        .map_err(|f| fail(&plan, "does not build", f))?;
                    self.record(chroot, &plan, &system);
                    plan.manifest.system = Some(system);
                }
                // What goes into the host's cache/ (and the derivation it came from).
                if let Some(system) = plan.manifest.system.clone().filter(|_| !self.dry_run) {
                    let drv = self.deriver(&system);
                    let mut roots = vec![&system];
                    roots.extend(drv.as_ref());
                    self.refuse_leaks(store, &plan, &roots)?;
                }
            }
        }
        plan.manifest.system = settle_system(build_on, live.as_ref(), &plan.manifest);
        Ok((plan, build_on == BuildOn::Server))
    }

    /// Whether a host whose configuration tree changed runs the same as its live version:
    /// its evaluated system, files and settings are the live version's (a file only
    /// another host of its flake directory imports changed). Otherwise records what this
    /// configuration evaluated to, for the next publish to compare.
    fn same_system(
        &self,
        chroot: &Chroot,
        live: Option<&Manifest>,
        plan: &HostPlan,
        drv: &StorePath,
    ) -> bool {
        let systems = records::Systems::new(&records::dir(chroot));
        // Only a flake directory is shared by hosts; a classic host's directory is its own,
        // and a change there is meant for it.
        let shared = plan.manifest.build == Build::Flake;
        if let Some(live) = live.filter(|l| shared && same_but_tree(l, &plan.manifest)) {
            let live_key = record::content_key(live.build, &live.config);
            if systems.drv_for(&plan.host, &live_key).as_deref() == Some(drv.as_str()) {
                tracing::info!(
                    "{}: configuration changed, system did not ({drv})",
                    plan.host
                );
                return true;
            }
        }
        let rec = records::SystemRecord {
            key: record::content_key(plan.manifest.build, &plan.manifest.config),
            drv: drv.as_str().to_owned(),
        };
        if self.dry_run {
            return false;
        }
        if let Err(e) = systems.put(&plan.host, &rec) {
            // Without the record the next publish of this tree counts as changed: no harm.
            tracing::warn!("{}: cannot record its evaluated system: {e}", plan.host);
        }
        false
    }

    /// What a server build made, as `bento build` records it (for `bento status` and `diff`).
    fn record(&self, chroot: &Chroot, plan: &HostPlan, system: &StorePath) {
        let rec = BuildRecord {
            format: record::RECORD_FORMAT,
            host: plan.host.clone(),
            key: record::content_key(plan.manifest.build, &plan.manifest.config),
            system: Some(system.clone()),
            drv: None,
            built: true,
            time: humantime::format_rfc3339_seconds(self.now).to_string(),
        };
        if let Err(e) = record::write(chroot, &rec) {
            tracing::warn!("{}: built {system}, but cannot record it: {e}", plan.host);
        }
    }
}

impl crate::server::publish::Delivery for FleetDelivery<'_> {
    fn before(
        &self,
        store: &dyn Store,
        chroot: &Chroot,
        plans: Vec<HostPlan>,
    ) -> (Vec<HostPlan>, Vec<HostReport>) {
        self.guard.load(chroot);
        let done = self.deliver(store, chroot, plans);
        if !self.dry_run {
            self.guard.save(chroot);
        }
        done
    }

    fn after(&self, store: &dyn Store, chroot: &Chroot) -> Result<(), PublishError> {
        // Without a cache key no host has a `cache/` to collect (and an object store is not
        // listed host by host for nothing).
        if self.key.is_none() {
            return Ok(());
        }
        cache::collect(store, chroot)
            .map(|n| tracing::debug!("removed {n} unused cache files"))
            .map_err(|e| PublishError::Internal(format!("collecting binary caches: {e}")))
    }
}

impl FleetDelivery<'_> {
    fn deliver(
        &self,
        store: &dyn Store,
        chroot: &Chroot,
        plans: Vec<HostPlan>,
    ) -> (Vec<HostPlan>, Vec<HostReport>) {
        let prepared: Vec<Result<(HostPlan, bool), Box<HostReport>>> =
            match rayon::ThreadPoolBuilder::new()
                .num_threads(self.jobs.max(1))
                .build()
            {
                Ok(pool) => pool.install(|| {
                    plans
                        .into_par_iter()
                        .map(|p| self.prepare(store, chroot, p))
                        .collect()
                }),
                Err(_) => plans
                    .into_iter()
                    .map(|p| self.prepare(store, chroot, p))
                    .collect(),
            };
        let mut ready = Vec::new();
        let mut held = Vec::new();
        let mut cached = Vec::new();
        for p in prepared {
            match p {
                Ok((plan, true)) => cached.push(plan),
                Ok((plan, false)) => ready.push(plan),
                Err(report) => held.push(*report),
            }
        }
        let Some(key) = self.key.as_ref().filter(|_| !self.dry_run) else {
            ready.extend(cached);
            ready.sort_by(|a, b| a.host.cmp(&b.host));
            return (ready, held);
        };
        // One export for every server-built system, then each host's links.
        let systems: Vec<StorePath> = cached
            .iter()
            .filter_map(|p| p.manifest.system.clone())
            .collect();
        if let Err(e) = cache::export(&self.nix, chroot, key, &systems) {
            let message = format!("cannot export the binary cache: {e}");
            held.extend(
                cached
                    .iter()
                    .map(|p| Self::failed(store, p, message.clone())),
            );
            return (ready, held);
        }
        for plan in cached {
            let system = plan
                .manifest
                .system
                .clone()
                .expect("server hosts have a system");
            // The host's area must exist (with its owners) before cache/ goes in it.
            let linked = store
                .open_host(&plan.host)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    cache::link_host(store, chroot, &plan.host, key, &system)
                        .map_err(|e| e.to_string())
                });
            match linked {
                Ok(l) => {
                    tracing::debug!(
                        "{}: cache holds {} paths ({} new links)",
                        plan.host,
                        l.paths,
                        l.new_links
                    );
                    ready.push(plan);
                }
                Err(e) => held.push(Self::failed(
                    store,
                    &plan,
                    format!("cannot fill {}/cache: {e}", plan.host),
                )),
            }
        }
        ready.sort_by(|a, b| a.host.cmp(&b.host));
        (ready, held)
    }
}

/// The report of a host `publish --build` holds back because its build failed.
pub fn not_built(store: &dyn Store, b: &crate::server::build::HostBuild) -> HostReport {
    HostReport {
        host: b.host.clone(),
        status: Status::Failed,
        digest: live_digest(store, &b.host),
        config_entries: 0,
        files: 0,
        objects: 0,
        new_objects: 0,
        bytes: 0,
        error: Some(format!(
            "does not build: {}",
            b.error.as_deref().unwrap_or("no error message")
        )),
        reason: None,
        warnings: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::manifest::{Build, ConfigEntry, RelPath, FORMAT};

    fn manifest(version: &str, system: Option<&str>) -> Manifest {
        Manifest {
            format: FORMAT,
            host: crate::protocol::HostName::new("alpha").unwrap(),
            created: "2026-11-25T12:00:00Z".parse().unwrap(),
            serial: 0,
            source_commit: None,
            dirty: false,
            build: Build::Flake,
            system: system.map(|s| StorePath::new(s).unwrap()),
            config: vec![ConfigEntry::Directory {
                path: RelPath::new(version).unwrap(),
            }],
            tree: None,
            files: vec![],
        }
    }

    const X: &str = "/nix/store/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-nixos-system-alpha-1";
    const Y: &str = "/nix/store/yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy-nixos-system-alpha-1";

    #[test]
    fn unchanged_content_keeps_its_version_with_or_without_build() {
        let sys = |s: Option<&str>| s.map(|s| StorePath::new(s).unwrap());
        let host = BuildOn::Host;
        let live_x = manifest("v1", Some(X));
        let live_none = manifest("v1", None);
        // publish --build, then publish: the recorded system is kept.
        assert_eq!(
            settle_system(host, Some(&live_x), &manifest("v1", None)),
            sys(Some(X))
        );
        // publish, then publish --build: the live null is kept (no new version).
        assert_eq!(
            settle_system(host, Some(&live_none), &manifest("v1", Some(X))),
            None
        );
        // A different build of the same tree is a change of what the host should run.
        assert_eq!(
            settle_system(host, Some(&live_x), &manifest("v1", Some(Y))),
            sys(Some(Y))
        );
        // Changed content: whatever this run built (or nothing).
        assert_eq!(
            settle_system(host, Some(&live_x), &manifest("v2", None)),
            None
        );
        assert_eq!(
            settle_system(host, None, &manifest("v1", Some(X))),
            sys(Some(X))
        );
        // Server-built hosts always name what they run.
        assert_eq!(
            settle_system(BuildOn::Server, Some(&live_none), &manifest("v1", Some(X))),
            sys(Some(X))
        );
        // Time and commit are not content.
        let mut later = manifest("v1", None);
        later.created = "2030-01-01T00:00:00Z".parse().unwrap();
        assert!(same_except_system(&live_x, &later));
    }
}
