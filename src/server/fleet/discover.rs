//! Host discovery: `hosts/<dir>` without `flake.nix` is one classic host named after the
//! directory; with `flake.nix` it yields one host per `nixosConfigurations` attribute. Every
//! name is validated and two hosts of one name are refused, naming both places.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::{Fleet, HostName, NameError, HOSTS_DIR};
use crate::nix::{Nix, NixError};
use crate::protocol::manifest::{Build, Digest};
use crate::server::snapshot::{is_skipped_name, Item, ItemKind, Scanner, SnapshotError};

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{dir}: has neither flake.nix nor configuration.nix")]
    NoConfig { dir: PathBuf },
    #[error("{origin}: {source}")]
    Name { origin: String, source: NameError },
    #[error("host {name} is defined twice: by {first} and by {second}")]
    Duplicate {
        name: HostName,
        first: String,
        second: String,
    },
    #[error("bento.toml has [hosts.{0}] but no directory under hosts/ defines that host")]
    Undefined(HostName),
    #[error("{dir}: cannot list its nixosConfigurations: {source}")]
    Flake { dir: PathBuf, source: NixError },
}

/// One host found in the fleet repo.
#[derive(Debug, Clone)]
pub struct HostSource {
    pub name: HostName,
    /// The host's directory relative to the fleet root (`hosts/alpha`).
    pub dir: PathBuf,
    pub build: Build,
    /// In a flake directory, the host's own files are under `files/<host>/`.
    pub files_prefix: Option<String>,
    /// Where the host comes from, for messages.
    pub origin: String,
    /// The directory's tree, symlinks resolved.
    pub items: Arc<Vec<Item>>,
}

/// Lists the hosts a flake directory defines.
pub trait FlakeHosts: Sync {
    fn host_names(&self, dir: &Path, items: &[Item]) -> Result<Vec<String>, NixError>;
    /// Persists whatever the implementation remembers between runs.
    fn save(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Asks Nix, on a copy of the directory's resolved tree (so symlinked modules resolve
/// exactly as the host will see them), and remembers the answer by content.
pub struct NixFlakeHosts {
    nix: Nix,
    cache_path: Option<PathBuf>,
    cache: Mutex<BTreeMap<String, Vec<String>>>,
    used: Mutex<std::collections::BTreeSet<String>>,
}

impl NixFlakeHosts {
    pub fn new(nix: Nix, cache_path: Option<PathBuf>) -> Self {
        let cache = cache_path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            nix,
            cache_path,
            cache: Mutex::new(cache),
            used: Mutex::default(),
        }
    }
}

/// A content key for a tree: paths, kinds, hashes and executable bits.
pub fn tree_key(items: &[Item]) -> String {
    let mut text = String::new();
    for i in items {
        match &i.kind {
            ItemKind::Dir => text.push_str(&format!("d {}\n", i.path)),
            ItemKind::File {
                sha256, executable, ..
            } => text.push_str(&format!("f {} {} {}\n", i.path, sha256, executable)),
        }
    }
    Digest::of(text.as_bytes()).to_hex()
}

impl FlakeHosts for NixFlakeHosts {
    /// Writes the answers used in this run (older ones are dropped).
    fn save(&self) -> std::io::Result<()> {
        let used = self.used.lock().expect("lock");
        if let Some(path) = &self.cache_path {
            let cache = self.cache.lock().expect("lock");
            let keep: BTreeMap<&String, &Vec<String>> =
                cache.iter().filter(|(k, _)| used.contains(*k)).collect();
            crate::sys::atomic::write_file(path, &serde_json::to_vec(&keep)?, 0o600)?;
        }
        Ok(())
    }

    fn host_names(&self, _dir: &Path, items: &[Item]) -> Result<Vec<String>, NixError> {
        let key = tree_key(items);
        self.used.lock().expect("lock").insert(key.clone());
        if let Some(names) = self.cache.lock().expect("lock").get(&key) {
            return Ok(names.clone());
        }
        let tmp = tempfile::Builder::new()
            .prefix("bento-eval-")
            .tempdir()
            .map_err(|e| NixError::Output {
                argv: "nix eval".into(),
                message: format!("cannot create a temporary directory: {e}"),
            })?;
        materialize(items, tmp.path()).map_err(|e| NixError::Output {
            argv: "nix eval".into(),
            message: format!("cannot copy the flake to {}: {e}", tmp.path().display()),
        })?;
        let names = self.nix.flake_nixos_configurations(tmp.path())?;
        self.cache.lock().expect("lock").insert(key, names.clone());
        Ok(names)
    }
}

/// Writes a tree of items into `dest` (which exists).
pub fn materialize(items: &[Item], dest: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for i in items {
        let path = dest.join(&i.path);
        match &i.kind {
            ItemKind::Dir => std::fs::create_dir_all(&path)?,
            ItemKind::File {
                source, executable, ..
            } => {
                let mut from = crate::server::snapshot::repo::open_resolved_file(source)?;
                std::io::copy(&mut from, &mut std::fs::File::create(&path)?)?;
                let mode = if *executable { 0o755 } else { 0o644 };
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            }
        }
    }
    Ok(())
}

/// Keeps the hosts named in `only` (all when it is empty); `Err` names the first host of
/// `only` the fleet does not define.
pub fn select(sources: Vec<HostSource>, only: &[HostName]) -> Result<Vec<HostSource>, HostName> {
    if let Some(unknown) = only.iter().find(|n| !sources.iter().any(|s| &s.name == *n)) {
        return Err(unknown.clone());
    }
    Ok(sources
        .into_iter()
        .filter(|s| only.is_empty() || only.contains(&s.name))
        .collect())
}

/// Finds every host of the fleet.
pub fn discover(
    fleet: &Fleet,
    scanner: &Scanner,
    flakes: &dyn FlakeHosts,
) -> Result<Vec<HostSource>, DiscoverError> {
    let hosts_dir = fleet.root.join(HOSTS_DIR);
    let io_err = |source| DiscoverError::Io {
        path: PathBuf::from(HOSTS_DIR),
        source,
    };
    // Plain files (a README) are not hosts; a symlink to a directory is.
    let mut dirs = match scanner.subdirs(&hosts_dir) {
        Ok(dirs) => dirs,
        Err(SnapshotError::Io { source, .. }) => return Err(io_err(source)),
        Err(e) => return Err(e.into()),
    };
    dirs.retain(|name| !is_skipped_name(name) && !name.starts_with('.'));
    dirs.sort();

    let found: Vec<Result<Vec<HostSource>, DiscoverError>> = dirs
        .par_iter()
        .map(|name| discover_dir(scanner, flakes, &hosts_dir, name))
        .collect();

    let mut seen: HashMap<HostName, String> = HashMap::new();
    let mut hosts = Vec::new();
    for result in found {
        for host in result? {
            if let Some(first) = seen.get(&host.name) {
                return Err(DiscoverError::Duplicate {
                    name: host.name.clone(),
                    first: first.clone(),
                    second: host.origin.clone(),
                });
            }
            seen.insert(host.name.clone(), host.origin.clone());
            hosts.push(host);
        }
    }
    for name in fleet.config.hosts.keys() {
        if !seen.contains_key(name) {
            return Err(DiscoverError::Undefined(name.clone()));
        }
    }
    for host in &hosts {
        fleet
            .config
            .account(&host.name)
            .map_err(|source| DiscoverError::Name {
                origin: host.origin.clone(),
                source,
            })?;
    }
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(hosts)
}

fn discover_dir(
    scanner: &Scanner,
    flakes: &dyn FlakeHosts,
    hosts_dir: &Path,
    name: &str,
) -> Result<Vec<HostSource>, DiscoverError> {
    let rel = Path::new(HOSTS_DIR).join(name);
    let items = scanner.scan(&hosts_dir.join(name))?;
    let has = |file: &str| {
        items
            .iter()
            .any(|i| i.path == file && matches!(i.kind, ItemKind::File { .. }))
    };
    if has("flake.nix") {
        // Secrets must never be copied into the store, not even for evaluation.
        let config_only: Vec<Item> = items
            .iter()
            .filter(|i| !crate::server::hostfiles::is_host_file(&i.path))
            .cloned()
            .collect();
        let names =
            flakes
                .host_names(&rel, &config_only)
                .map_err(|source| DiscoverError::Flake {
                    dir: rel.clone(),
                    source,
                })?;
        names
            .into_iter()
            .map(|attr| {
                let origin = format!("{}/flake.nix (nixosConfigurations.{attr})", rel.display());
                let host = HostName::new(&attr).map_err(|source| DiscoverError::Name {
                    origin: origin.clone(),
                    source,
                })?;
                Ok(HostSource {
                    files_prefix: Some(host.to_string()),
                    name: host,
                    dir: rel.clone(),
                    build: Build::Flake,
                    origin,
                    items: items.clone(),
                })
            })
            .collect()
    } else if has("configuration.nix") {
        let origin = rel.display().to_string();
        let host = HostName::new(name).map_err(|source| DiscoverError::Name {
            origin: origin.clone(),
            source,
        })?;
        Ok(vec![HostSource {
            name: host,
            dir: rel,
            build: Build::Classic,
            files_prefix: None,
            origin,
            items,
        }])
    } else {
        Err(DiscoverError::NoConfig { dir: rel })
    }
}
