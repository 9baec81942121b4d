//! Choosing what a command works on: `--host NAME`, `--on SELECTOR` (the selectors
//! themselves are `server::select`) and `hold = true`, the chroot (the flag or bento.toml's),
//! how many jobs at once.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::nix::Nix;
use crate::protocol::layout::Chroot;
use crate::server::fleet::{Fleet, HostName, NixFlakeHosts};
use crate::server::select::{self, Selector};
use crate::server::snapshot::{HashCache, Scanner};
use crate::server::store::{ChrootStore, S3Store, Store};
use crate::sys::output;
use crate::sys::s3::{Client, Credentials, Location, Options};

/// clap's value parser for `--host NAME`.
pub fn parse_host(s: &str) -> Result<HostName, String> {
    HostName::new(s).map_err(|e| e.to_string())
}

/// Builds (or other parallel work) at once by default: the number of cores.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// The chroot root: `--chroot DIR`, else `[server] chroot` of bento.toml, made absolute.
/// With `[server] store = "s3://…"` there is no chroot: this is the local root of the
/// publisher's own state (`[server] state`), whose `.bento/` the chroot would have held.
pub fn chroot_of(fleet: &Fleet, chroot: Option<PathBuf>) -> anyhow::Result<Chroot> {
    let server = &fleet.config.server;
    if let Some(store) = &server.store {
        if let Some(dir) = chroot {
            anyhow::bail!(
                "--chroot {} names a chroot, but {} publishes to {store} ([server] store); leave --chroot out",
                dir.display(),
                fleet.root.join(crate::server::fleet::FLEET_FILE).display()
            );
        }
        let state = server
            .state
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::server::fleet::DEFAULT_STATE));
        let state = std::path::absolute(&state)
            .with_context(|| format!("[server] state {}", state.display()))?;
        return Ok(Chroot::new(state));
    }
    let root = chroot.unwrap_or_else(|| server.chroot.clone());
    let root = std::path::absolute(&root).with_context(|| format!("chroot {}", root.display()))?;
    Ok(Chroot::new(root))
}

/// The chroot's directory owners as this user can set them: bento's accounts as root.
pub fn ownership(fleet: &Fleet) -> crate::server::chroot::Ownership {
    if crate::sys::accounts::is_root() {
        crate::server::chroot::Ownership::Root {
            prefix: fleet.config.server.account_prefix.clone(),
        }
    } else {
        crate::server::chroot::Ownership::Leave
    }
}

/// The store the hosts' versions live in and their reports are read from: the one place a
/// command picks it. The chroot (`--chroot DIR` or `[server] chroot`), with bento's account
/// owners when running as root; or, with `[server] store = "s3://…"`, the object store,
/// signed with `[server] s3_credentials` (or the environment's), the lock and the rest of
/// the publisher's state in `chroot` (`chroot_of` made it `[server] state`).
pub fn store_of(fleet: &Fleet, chroot: &Chroot) -> anyhow::Result<Box<dyn Store>> {
    if fleet.config.server.store.is_none() {
        return Ok(Box::new(ChrootStore::new(chroot.clone(), ownership(fleet))));
    }
    Ok(Box::new(s3_store_of(fleet, chroot)?))
}

/// The object store of `[server] store` (see [`store_of`]).
pub fn s3_store_of(fleet: &Fleet, chroot: &Chroot) -> anyhow::Result<S3Store> {
    let server = &fleet.config.server;
    let url = server
        .store
        .as_deref()
        .context("no [server] store = \"s3://…\" in bento.toml")?;
    let file = || fleet.root.join(crate::server::fleet::FLEET_FILE);
    let files: Location = url
        .parse()
        .with_context(|| format!("{}: [server] store", file().display()))?;
    if !files.is_template() {
        anyhow::bail!(
            "{}: [server] store = {url:?} names no {{host}}: put it in the prefix (one prefix per host) or the bucket name (one bucket per host)",
            file().display()
        );
    }
    let reports = match &server.reports {
        None => None,
        Some(r) => {
            let l: Location = r
                .parse()
                .with_context(|| format!("{}: [server] reports", file().display()))?;
            if !l.is_template() {
                anyhow::bail!(
                    "{}: [server] reports = {r:?} names no {{host}}: each host needs its own place",
                    file().display()
                );
            }
            Some(l)
        }
    };
    if let Some(path) = &server.s3_credentials {
        let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        if abs.starts_with(&fleet.root) {
            anyhow::bail!(
                "[server] s3_credentials {} is inside the fleet repo {}; keep it out (it would be committed and could be published)",
                path.display(),
                fleet.root.display()
            );
        }
    }
    let creds = Credentials::resolve(server.s3_credentials.as_deref())?;
    let client = Client::new(&files.endpoint, &files.region, &creds, &Options::default())
        .with_context(|| format!("{}: [server] store", file().display()))?;
    let mut known: Vec<HostName> = fleet.config.hosts.keys().cloned().collect();
    if let Ok(entries) = std::fs::read_dir(fleet.root.join(crate::server::fleet::HOSTS_DIR)) {
        known.extend(
            entries
                .flatten()
                .filter_map(|e| HostName::new(&e.file_name().to_string_lossy()).ok()),
        );
    }
    known.sort();
    known.dedup();
    let cas = crate::server::store::probe::recorded(chroot);
    Ok(S3Store::new(client, files, reports, chroot.clone(), known).with_cas(cas))
}

/// The `--on` option, flattened into a command's arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OnArgs {
    /// Only the hosts this selects (repeatable): a host name, a glob ('web-*'), @tag or N%
    #[arg(long = "on", value_name = "SELECTOR")]
    pub on: Vec<Selector>,
}

/// `--host` names plus what `--on` selects from `universe`; empty (= every host) when
/// neither is given.
pub fn combine(
    fleet: &Fleet,
    hosts: &[HostName],
    on: &[Selector],
    universe: &[HostName],
) -> anyhow::Result<Vec<HostName>> {
    if on.is_empty() {
        return Ok(hosts.to_vec());
    }
    let mut chosen = select::resolve(on, universe, &crate::server::targets::tags(&fleet.config))
        .with_context(|| format!("selecting hosts in {}", fleet.root.display()))?;
    for h in hosts {
        if !chosen.contains(h) {
            chosen.push(h.clone());
        }
    }
    Ok(chosen)
}

/// For commands that read the chroot (status, diff, trigger, rollback): selectors match
/// hosts of bento.toml and hosts with a directory in the chroot.
pub fn known(
    fleet: &Fleet,
    chroot: &Chroot,
    hosts: &[HostName],
    on: &[Selector],
) -> anyhow::Result<Vec<HostName>> {
    if on.is_empty() {
        return Ok(hosts.to_vec());
    }
    let universe = crate::server::targets::known_hosts(&fleet.config, &chroot.root)
        .with_context(|| format!("listing hosts in {}", chroot.root.display()))?;
    combine(fleet, hosts, on, &universe)
}

/// Every host the fleet repo defines (as publish finds them: `hosts/`, flakes listed), and
/// every `[hosts.NAME]` of bento.toml: a flake directory that cannot list its hosts is
/// named by publish, and does not stop the others from being selected.
pub fn discovered(fleet: &Fleet, chroot: &Chroot) -> anyhow::Result<Vec<HostName>> {
    let scanner = Scanner::new(
        fleet.root.clone(),
        HashCache::load(&chroot.hash_cache_path()),
        std::time::SystemTime::now(),
    );
    let flakes = NixFlakeHosts::new(Nix::default(), Some(chroot.flake_cache_path()));
    let found = crate::server::fleet::discover_each(fleet, &scanner, &flakes)
        .with_context(|| format!("finding the hosts of {}", fleet.root.display()))?;
    Ok(found.names())
}

/// For commands that work from the fleet repo (publish, build): selectors match the hosts
/// it defines.
pub fn defined(
    fleet: &Fleet,
    chroot: &Chroot,
    hosts: &[HostName],
    on: &[Selector],
) -> anyhow::Result<Vec<HostName>> {
    if on.is_empty() {
        return Ok(hosts.to_vec());
    }
    combine(fleet, hosts, on, &discovered(fleet, chroot)?)
}

/// What publish may publish: the selection without the hosts with `hold = true` (each
/// named on stderr). `None` when every selected host is held: nothing to publish.
pub fn publishable(
    fleet: &Fleet,
    chroot: &Chroot,
    hosts: &[HostName],
    on: &[Selector],
) -> anyhow::Result<Option<Vec<HostName>>> {
    let selected = defined(fleet, chroot, hosts, on)?;
    let held = crate::server::targets::held(&fleet.config);
    if held.is_empty() {
        return Ok(Some(selected));
    }
    // An empty selection means every host: spell it out, so the held ones can be left out.
    let all = if selected.is_empty() {
        discovered(fleet, chroot)?
    } else {
        selected
    };
    let (held_now, rest): (Vec<HostName>, Vec<HostName>) =
        all.into_iter().partition(|h| held.contains(h));
    for h in &held_now {
        output::note(&format!(
            "not publishing {h}: hold = true under [hosts.{h}] in bento.toml"
        ));
    }
    Ok((!rest.is_empty()).then_some(rest))
}
