//! Host discovery: `hosts/<dir>` without `flake.nix` is one classic host named after the
//! directory; with `flake.nix` it yields one host per `nixosConfigurations` attribute. Every
//! name is validated and two hosts of one name are refused, naming both places.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::{Fleet, HostName, NameError, HOSTS_DIR};
use crate::nix::locate::{summary, SourceMap};
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
    #[error("{}", undefined_message(.0))]
    Undefined(HostName),
    #[error("{0}")]
    Flake(BrokenDir),
}

/// What to say about a `[hosts.NAME]` of bento.toml that no directory defines.
pub fn undefined_message(name: &HostName) -> String {
    format!(
        "bento.toml has [hosts.{name}] but no directory under hosts/ defines that host: \
         create hosts/{name}/configuration.nix or a flake's nixosConfigurations.{name}, \
         or remove [hosts.{name}]"
    )
}

/// A flake directory whose hosts could not be listed: its `nixosConfigurations` did not
/// evaluate. Which hosts it defines is unknown, so none of them can be published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{dir}: cannot list its nixosConfigurations: {message}")]
pub struct BrokenDir {
    /// The directory relative to the fleet root (`hosts/multi`).
    pub dir: PathBuf,
    /// One line, with Nix's paths mapped to the fleet repo's files.
    pub message: String,
    /// The end of Nix's output, mapped the same way.
    pub log_tail: String,
}

/// Everything discovery found, the broken parts beside the hosts, so a caller can publish
/// the hosts that are fine and name the rest.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    /// The hosts, by name.
    pub hosts: Vec<HostSource>,
    /// Flake directories whose hosts could not be listed.
    pub broken: Vec<BrokenDir>,
    /// `[hosts.NAME]` entries of bento.toml that no listed directory defines.
    pub undefined: Vec<HostName>,
    /// Directories named as a host that could not be read (a link out of the repo, an
    /// unreadable file): that host fails alone, with this error.
    pub failed: Vec<(HostName, String)>,
}

impl Discovery {
    /// Every host, or the first broken part as an error.
    pub fn strict(self) -> Result<Vec<HostSource>, DiscoverError> {
        if let Some((host, e)) = self.failed.into_iter().next() {
            return Err(DiscoverError::Io {
                path: Path::new(HOSTS_DIR).join(host.as_str()),
                source: std::io::Error::other(e),
            });
        }
        if let Some(b) = self.broken.into_iter().next() {
            return Err(DiscoverError::Flake(b));
        }
        if let Some(name) = self.undefined.into_iter().next() {
            return Err(DiscoverError::Undefined(name));
        }
        Ok(self.hosts)
    }

    /// Keeps the hosts named in `only` (all when it is empty): the listed ones, and apart the
    /// `[hosts.NAME]` without a directory among them. `Err` names the first host of `only`
    /// that is neither.
    pub fn choose(
        &mut self,
        only: &[HostName],
    ) -> Result<(Vec<HostSource>, Vec<HostName>), HostName> {
        let hosts = std::mem::take(&mut self.hosts);
        let undefined = std::mem::take(&mut self.undefined);
        if only.is_empty() {
            return Ok((hosts, undefined));
        }
        let (wanted_undefined, listed): (Vec<HostName>, Vec<HostName>) =
            only.iter().cloned().partition(|h| undefined.contains(h));
        let hosts = if listed.is_empty() {
            Vec::new()
        } else {
            select(hosts, &listed)?
        };
        Ok((hosts, wanted_undefined))
    }

    /// The names of every host found, and of the `[hosts.NAME]` entries no directory defines.
    pub fn names(&self) -> Vec<HostName> {
        let mut names: Vec<HostName> = self.hosts.iter().map(|h| h.name.clone()).collect();
        names.extend(self.undefined.iter().cloned());
        names.extend(self.failed.iter().map(|(h, _)| h.clone()));
        names.sort();
        names
    }
}

const LOCK_FILE: &str = "flake.lock";

/// Name of the scratch copies a flake directory is listed from.
const EVAL_PREFIX: &str = "bento-eval-";

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
    /// What publish goes on with but the user should fix (said once per directory, given to
    /// each of its hosts).
    pub warnings: Vec<String>,
}

/// What a flake directory defines.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlakeListing {
    /// The `nixosConfigurations` attribute names.
    pub names: Vec<String>,
    /// The flake has inputs its tree holds no `flake.lock` for (Nix had to lock them).
    pub unlocked_inputs: bool,
}

/// Lists the hosts a flake directory defines.
pub trait FlakeHosts: Sync {
    fn host_names(&self, dir: &Path, items: &[Item]) -> Result<FlakeListing, NixError>;
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
    cache: Mutex<BTreeMap<String, FlakeListing>>,
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
            let keep: BTreeMap<&String, &FlakeListing> =
                cache.iter().filter(|(k, _)| used.contains(*k)).collect();
            crate::sys::atomic::write_file(path, &serde_json::to_vec(&keep)?, 0o600)?;
        }
        Ok(())
    }

    fn host_names(&self, _dir: &Path, items: &[Item]) -> Result<FlakeListing, NixError> {
        let key = tree_key(items);
        self.used.lock().expect("lock").insert(key.clone());
        if let Some(names) = self.cache.lock().expect("lock").get(&key) {
            return Ok(names.clone());
        }
        let tmp = tempfile::Builder::new()
            .prefix(EVAL_PREFIX)
            .tempdir()
            .map_err(|e| NixError::Output {
                argv: "nix eval".into(),
                message: format!("cannot create a temporary directory: {e}"),
            })?;
        materialize(items, tmp.path()).map_err(|e| NixError::Output {
            argv: "nix eval".into(),
            message: format!("cannot copy the flake to {}: {e}", tmp.path().display()),
        })?;
        let had_lock = tmp.path().join(LOCK_FILE).exists();
        let names = self.nix.flake_nixos_configurations(tmp.path())?;
        // Nix writes a lock file into a `path:` flake only when it has inputs to lock.
        let listing = FlakeListing {
            names,
            unlocked_inputs: !had_lock && tmp.path().join(LOCK_FILE).exists(),
        };
        self.cache
            .lock()
            .expect("lock")
            .insert(key, listing.clone());
        Ok(listing)
    }
}

/// Writes a tree of items into `dest` (which exists).
pub fn materialize(items: &[Item], dest: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for i in items {
        let path = dest.join(&*i.path);
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

/// Finds every host of the fleet; a flake directory that does not list its hosts, or a
/// `[hosts.NAME]` no directory defines, is an error (see [`discover_each`]).
pub fn discover(
    fleet: &Fleet,
    scanner: &Scanner,
    flakes: &dyn FlakeHosts,
) -> Result<Vec<HostSource>, DiscoverError> {
    discover_each(fleet, scanner, flakes)?.strict()
}

/// Finds every host of the fleet. A flake directory whose hosts cannot be listed and a
/// `[hosts.NAME]` that no directory defines are returned beside the hosts, so one broken
/// directory does not hide the others; what makes the whole fleet unreadable (an unreadable
/// `hosts/`, a bad name, a host defined twice) is an error.
pub fn discover_each(
    fleet: &Fleet,
    scanner: &Scanner,
    flakes: &dyn FlakeHosts,
) -> Result<Discovery, DiscoverError> {
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

    let found: Vec<(&String, Result<Vec<HostSource>, DiscoverError>)> = dirs
        .par_iter()
        .map(|name| (name, discover_dir(scanner, flakes, &hosts_dir, name)))
        .collect();

    let mut seen: HashMap<HostName, String> = HashMap::new();
    let mut hosts = Vec::new();
    let mut broken = Vec::new();
    let mut failed = Vec::new();
    for (name, result) in found {
        let found = match result {
            Ok(found) => found,
            Err(DiscoverError::Flake(b)) => {
                broken.push(b);
                continue;
            }
            // A directory named as a host fails as that host, alone (issue #24 item 8).
            Err(e @ DiscoverError::Snapshot(_)) => match HostName::new(name) {
                Ok(host) => {
                    seen.insert(host.clone(), format!("{HOSTS_DIR}/{name}"));
                    failed.push((host, e.to_string()));
                    continue;
                }
                Err(_) => return Err(e),
            },
            Err(e) => return Err(e),
        };
        for host in found {
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
    let undefined = fleet
        .config
        .hosts
        .keys()
        .filter(|name| !seen.contains_key(*name))
        .cloned()
        .collect();
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
    Ok(Discovery {
        hosts,
        broken,
        undefined,
        failed,
    })
}

/// What a flake directory does silently wrong: files under `files/` that belong to none of
/// its hosts, inputs without a `flake.lock`.
fn flake_warnings(rel: &Path, items: &[Item], listing: &FlakeListing) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut stray = std::collections::BTreeSet::new();
    for i in items {
        let (Some(rest), ItemKind::File { .. }) = (i.path.strip_prefix("files/"), &i.kind) else {
            continue;
        };
        // `files/<host>/…` belongs to a host; a file directly under `files/` to none.
        match rest.split_once('/') {
            Some((first, _)) if listing.names.iter().any(|n| n == first) => {}
            Some((first, _)) => {
                stray.insert(first.to_owned());
            }
            None => {
                stray.insert(rest.to_owned());
            }
        }
    }
    if !stray.is_empty() {
        let shown: Vec<String> = stray
            .iter()
            .map(|s| format!("{}/files/{s}", rel.display()))
            .collect();
        warnings.push(format!(
            "{}: not under files/<host>/ for a host this flake defines ({}), so installed on no host: move it to {}/files/<host>/",
            shown.join(", "),
            listing.names.join(", "),
            rel.display()
        ));
    }
    let has_lock = items.iter().any(|i| &*i.path == LOCK_FILE);
    if listing.unlocked_inputs && !has_lock {
        warnings.push(format!(
            "{}/flake.nix has inputs but no flake.lock: each host would lock them itself, to whatever they are when it builds; run `bento flake-update` (or `nix flake lock` in {}) and commit {}/flake.lock",
            rel.display(),
            rel.display(),
            rel.display()
        ));
    }
    warnings
}

/// A flake directory's listing failure, with Nix's paths (the scratch copy, its
/// `/nix/store/…-source` copy) mapped to the fleet repo's files.
fn broken_dir(rel: &Path, items: &[Item], scanner: &Scanner, e: &NixError) -> BrokenDir {
    let root = scanner.root();
    let files = items.iter().filter_map(|i| match &i.kind {
        ItemKind::File { source, .. } => Some((
            i.path.to_string(),
            source
                .strip_prefix(root)
                .unwrap_or(source)
                .to_string_lossy()
                .into_owned(),
        )),
        ItemKind::Dir => None,
    });
    let map = SourceMap::new(files, &rel.to_string_lossy())
        .with_scratch_prefix(&std::env::temp_dir().join(EVAL_PREFIX));
    let log = map.rewrite(e.log());
    let fallback = map.rewrite(e.to_string().lines().next().unwrap_or_default());
    BrokenDir {
        dir: rel.to_owned(),
        message: summary(&log, &fallback),
        log_tail: crate::nix::tail(&log, 12),
    }
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
            .any(|i| &*i.path == file && matches!(i.kind, ItemKind::File { .. }))
    };
    if has("flake.nix") {
        // Secrets must never be copied into the store, not even for evaluation.
        let config_only: Vec<Item> = items
            .iter()
            .filter(|i| !crate::server::hostfiles::is_host_file(&i.path))
            .cloned()
            .collect();
        let listing = flakes
            .host_names(&rel, &config_only)
            .map_err(|e| DiscoverError::Flake(broken_dir(&rel, &config_only, scanner, &e)))?;
        let warnings = flake_warnings(&rel, &items, &listing);
        listing
            .names
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
                    warnings: warnings.clone(),
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
            warnings: Vec::new(),
        }])
    } else {
        Err(DiscoverError::NoConfig { dir: rel })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(path: &str, file: bool) -> Item {
        Item {
            path: path.into(),
            kind: if file {
                ItemKind::File {
                    source: Arc::from(Path::new("/dev/null")),
                    size: 0,
                    sha256: Digest::of(b""),
                    executable: false,
                }
            } else {
                ItemKind::Dir
            },
        }
    }

    fn listing(unlocked_inputs: bool) -> FlakeListing {
        FlakeListing {
            names: vec!["alpha".into(), "beta".into()],
            unlocked_inputs,
        }
    }

    #[test]
    fn flake_warnings_name_stray_files_and_unlocked_inputs() {
        let rel = Path::new("hosts/multi");
        let fine = [
            item("flake.nix", true),
            item("files", false),
            item("files/alpha", false),
            item("files/alpha/etc/x", true),
            // An empty directory installs nothing: not worth a word.
            item("files/gamma", false),
        ];
        assert!(flake_warnings(rel, &fine, &listing(false)).is_empty());

        let mut items = fine.to_vec();
        items.push(item("files/gamma/etc/y", true));
        items.push(item("files/loose", true));
        let w = flake_warnings(rel, &items, &listing(true));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("hosts/multi/files/gamma, hosts/multi/files/loose: ")
                && w[0].contains("(alpha, beta)"),
            "{w:?}"
        );
        assert!(w[1].contains("no flake.lock"), "{w:?}");
        // A flake.lock in the tree: Nix did not need to lock anything new.
        items.push(item("flake.lock", true));
        assert_eq!(flake_warnings(rel, &items, &listing(true)).len(), 1);
    }
}
