//! What the working tree builds to, before anything is published (issue #12): for each host
//! of the fleet repo as it is now, the system `bento build` recorded for exactly this content
//! (its content key), else the output path its derivation names when that is in this
//! server's store. `bento diff` compares it with what each host runs.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::nix::{Nix, StorePath};
use crate::protocol::layout::Chroot;
use crate::server::build::record;
use crate::server::fleet::{Fleet, HostName, NixFlakeHosts};
use crate::server::snapshot::{HashCache, Scanner};

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error(transparent)]
    Discover(#[from] crate::server::fleet::DiscoverError),
    #[error(transparent)]
    Plan(#[from] crate::server::publish::PublishError),
}

/// One host's system as the working tree has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeSystem {
    /// Built (recorded by `bento build` for this content, or present in the store).
    Built(StorePath),
    /// It evaluates to this path, which is not built on this server.
    NotBuilt(StorePath),
    /// It does not evaluate (the message names the fleet repo's file and line).
    Fails(String),
}

/// The working tree's system for each host in it (hosts only in the chroot are absent).
pub fn working_tree(
    fleet: &Fleet,
    chroot: &Chroot,
    nix: &Nix,
    only: &[HostName],
) -> Result<BTreeMap<HostName, TreeSystem>, PreviewError> {
    if !fleet.root.join(crate::server::fleet::HOSTS_DIR).is_dir() {
        return Ok(BTreeMap::new());
    }
    let scanner = Scanner::new(
        fleet.root.clone(),
        HashCache::load(&chroot.hash_cache_path()),
        SystemTime::now(),
    );
    let flakes = NixFlakeHosts::new(nix.clone(), Some(chroot.flake_cache_path()));
    let sources = crate::server::fleet::discover(fleet, &scanner, &flakes)?;
    let chosen: Vec<_> = sources
        .into_iter()
        .filter(|s| only.is_empty() || only.contains(&s.name))
        .collect();
    let plans = crate::server::publish::plan(
        &fleet.config,
        &chosen,
        &crate::protocol::Timestamp::from_unix(0),
        None,
        &Default::default(),
    )?;
    let mut out = BTreeMap::new();
    for plan in &plans {
        let key = record::content_key(plan.manifest.build, &plan.manifest.config);
        let recorded = record::read(chroot, &plan.host)
            .ok()
            .flatten()
            .filter(|r| r.key == key && r.built)
            .and_then(|r| r.system)
            .filter(|s| s.as_path().exists());
        let system = match recorded {
            Some(s) => TreeSystem::Built(s),
            None => match crate::server::eval::evaluate(nix, plan, &fleet.root) {
                Err(f) => TreeSystem::Fails(f.message),
                Ok(drv) => match output_of(nix, &drv) {
                    Some(s) if valid(nix, &s) => TreeSystem::Built(s),
                    Some(s) => TreeSystem::NotBuilt(s),
                    None => TreeSystem::Fails(format!("{drv} names no output")),
                },
            },
        };
        out.insert(plan.host.clone(), system);
    }
    Ok(out)
}

/// The output path a system derivation names (built or not).
pub fn output_of(nix: &Nix, drv: &StorePath) -> Option<StorePath> {
    let out = nix
        .run("nix-store", &["--query", "--outputs", drv.as_str()])
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .and_then(|l| StorePath::new(l.trim()).ok())
}

fn valid(nix: &Nix, path: &StorePath) -> bool {
    path.as_path().exists()
        && nix
            .run("nix-store", &["--check-validity", path.as_str()])
            .is_ok()
}
