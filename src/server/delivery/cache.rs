//! Per-host Nix binary caches for `build_on = "server"` hosts (docs/delivery.md). Closures
//! are exported once, by `nix copy`, into the server's root-only pool `<chroot>/.bento/cache/`
//! (zstd, signed with `[server] cache_key`); each host's `<host>/cache/` holds hard links to
//! the narinfos and NARs of the closures its kept manifests name, so 1,000 hosts sharing a
//! closure cost one copy.
//!
//! Invariants: a host's narinfo is linked only after its NAR, and both before the manifest
//! naming the system goes live; a pooled narinfo is signed by the current key (one that is
//! not is re-exported); pool entries no host links to any more are removed.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64ct::Encoding as _;

use crate::nix::{Nix, NixError, StorePath};
use crate::protocol::layout::{Area, Chroot, Key, SubPath};
use crate::protocol::manifest::Manifest;
use crate::protocol::narinfo::{self, CacheKeys, NarInfo, NarInfoError};
use crate::protocol::HostName;
use crate::server::store::{Store, StoreError};
use crate::sys::atomic;

/// A host's cache directory, beside `manifests/` and `objects/`.
pub const CACHE: &str = "cache";
pub const CACHE_INFO_FILE: &str = "nix-cache-info";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cache key {path}: {problem}")]
    Key { path: PathBuf, problem: String },
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error("{path}: {source}")]
    NarInfo { path: PathBuf, source: NarInfoError },
    #[error(transparent)]
    Store(Box<StoreError>),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The server's pool: one real binary cache holding every exported path once.
pub fn pool_dir(chroot: &Chroot) -> PathBuf {
    chroot.state_dir().join(CACHE)
}

/// `[server] cache_key`: the secret key file `nix key generate-secret` writes.
#[derive(Debug, Clone)]
pub struct CacheKey {
    pub path: PathBuf,
    /// `name:base64` public key, what hosts list in `cache_keys`.
    pub public: String,
    pub keys: CacheKeys,
}

impl CacheKey {
    pub fn load(path: &Path) -> Result<Self, CacheError> {
        let bad = |problem: &str| CacheError::Key {
            path: path.to_owned(),
            problem: problem.to_owned(),
        };
        let path = std::path::absolute(path).map_err(io_err(path))?;
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        let (name, b64) = text.trim().split_once(':').ok_or_else(|| {
            bad("not name:base64 (make one with `nix key generate-secret --key-name NAME`)")
        })?;
        let secret = base64ct::Base64::decode_vec(b64).map_err(|_| bad("not base64"))?;
        if secret.len() != 64 {
            return Err(bad("not an ed25519 secret key (64 bytes)"));
        }
        let public = format!("{name}:{}", base64ct::Base64::encode_string(&secret[32..]));
        let keys = CacheKeys::parse(&[&public]).map_err(|e| bad(&e.to_string()))?;
        Ok(Self { path, public, keys })
    }
}

/// Makes a new `[server] cache_key` at `path` (refusing to replace a file there), root-only
/// readable, and returns it loaded (its public half for hosts' `cache_keys`).
pub fn generate_key(nix: &Nix, path: &Path, name: &str) -> Result<CacheKey, CacheError> {
    if path.exists() {
        return Err(CacheError::Key {
            path: path.to_owned(),
            problem: "exists already; remove it first or choose another file with -o".into(),
        });
    }
    let secret = nix.generate_secret_key(name)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    atomic::write_file(path, format!("{secret}\n").as_bytes(), 0o600).map_err(io_err(path))?;
    CacheKey::load(path)
}

fn read_narinfo(dir: &Path, hash: &str) -> io::Result<String> {
    let path = dir.join(format!("{hash}.narinfo"));
    let meta = fs::symlink_metadata(&path)?;
    if !meta.is_file() || meta.len() as usize > narinfo::MAX_NARINFO_BYTES {
        return Err(io::Error::other("not a regular narinfo file"));
    }
    fs::read_to_string(path)
}

/// Exports the closures of `systems` into the pool with one `nix copy`. Paths already
/// pooled are skipped by Nix; a pooled narinfo not signed by `key` is removed first, so it
/// is exported (and signed) again.
pub fn export(
    nix: &Nix,
    chroot: &Chroot,
    key: &CacheKey,
    systems: &[StorePath],
) -> Result<(), CacheError> {
    if systems.is_empty() {
        return Ok(());
    }
    let pool = pool_dir(chroot);
    match fs::create_dir(&pool) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(&pool)(e)),
    }
    let mut args: Vec<String> = vec!["path-info".into(), "--recursive".into()];
    args.extend(systems.iter().map(|s| s.to_string()));
    let out = nix.run("nix", &args)?;
    for path in String::from_utf8_lossy(&out.stdout).lines() {
        let hash = narinfo::hash_part(path.trim());
        let Ok(text) = read_narinfo(&pool, hash) else {
            continue;
        };
        let signed = NarInfo::parse(&text).is_ok_and(|n| n.verify(&key.keys).is_ok());
        if !signed {
            let stale = pool.join(format!("{hash}.narinfo"));
            fs::remove_file(&stale).map_err(io_err(&stale))?;
        }
    }
    let url = format!(
        "file://{}?compression=zstd&secret-key={}",
        pool.display(),
        key.path.display()
    );
    // Nix remembers binary-cache lookups for days; the pool changes under it (collection).
    let mut args: Vec<String> = [
        "copy",
        "--option",
        "narinfo-cache-positive-ttl",
        "0",
        "--option",
        "narinfo-cache-negative-ttl",
        "0",
        "--to",
    ]
    .map(String::from)
    .to_vec();
    args.push(url);
    args.extend(systems.iter().map(|s| s.to_string()));
    nix.run("nix", &args)?;
    Ok(())
}

/// What linking one host's closure did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Linked {
    pub paths: usize,
    pub new_links: usize,
}

fn cache_key(rel: &str) -> Key {
    // The pool's names are Nix's (`<hash>.narinfo`, `nar/<filehash>.nar.zst`), checked
    // plain by `narinfo::missing`.
    Key::Cache(SubPath::new(rel).expect("a narinfo's name or URL is a plain relative path"))
}

fn store_err(e: StoreError) -> CacheError {
    CacheError::Store(Box::new(e))
}

/// Makes `host`'s `cache/` a binary cache holding `system`'s closure through the store:
/// each NAR, then its narinfo, from the pool (checked against `key` on the way), and
/// `nix-cache-info`.
pub fn link_host(
    store: &dyn Store,
    state: &Chroot,
    host: &HostName,
    key: &CacheKey,
    system: &StorePath,
) -> Result<Linked, CacheError> {
    let pool = pool_dir(state);
    let infos = narinfo::missing(
        system.as_str(),
        &key.keys,
        |_| false,
        |h| read_narinfo(&pool, h),
    )
    .map_err(|e| CacheError::NarInfo {
        path: pool.clone(),
        source: NarInfoError::File {
            store_path: system.to_string(),
            problem: e.to_string(),
        },
    })?;
    let mut linked = Linked::default();
    for info in &infos {
        if SubPath::new(&info.url).is_none() {
            return Err(CacheError::NarInfo {
                path: pool.clone(),
                source: NarInfoError::File {
                    store_path: info.store_path.clone(),
                    problem: format!("URL {:?} is not a plain relative path", info.url),
                },
            });
        }
        let narinfo = format!("{}.narinfo", info.hash_part());
        for rel in [info.url.as_str(), narinfo.as_str()] {
            let changed = store
                .put_shared(host, &cache_key(rel), &pool.join(rel))
                .map_err(store_err)?;
            linked.new_links += usize::from(changed);
        }
        linked.paths += 1;
    }
    let info_key = cache_key(CACHE_INFO_FILE);
    let have = store
        .get(host, &info_key, narinfo::CACHE_INFO.len() as u64 + 1)
        .ok()
        .flatten();
    if have.as_deref() != Some(narinfo::CACHE_INFO.as_bytes()) {
        store
            .put(host, &info_key, narinfo::CACHE_INFO.as_bytes())
            .map_err(store_err)?;
    }
    Ok(linked)
}

/// Every narinfo name and NAR URL reachable in `host`'s cache from `roots` (parsed, not
/// verified: this decides only what to keep).
fn reachable(
    store: &dyn Store,
    host: &HostName,
    roots: &[StorePath],
) -> Result<BTreeSet<String>, CacheError> {
    let mut keep = BTreeSet::new();
    let mut todo: Vec<String> = roots.iter().map(|s| s.to_string()).collect();
    let mut seen = BTreeSet::new();
    while let Some(path) = todo.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        let hash = narinfo::hash_part(&path);
        let name = format!("{hash}.narinfo");
        let Some(sub) = SubPath::new(&name) else {
            continue;
        };
        let bytes = match store.get(host, &Key::Cache(sub), narinfo::MAX_NARINFO_BYTES as u64) {
            Ok(Some(b)) => b,
            Ok(None) | Err(StoreError::TooLarge { .. }) => continue,
            Err(e) => return Err(store_err(e)),
        };
        let Some(info) = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|t| NarInfo::parse(t).ok())
        else {
            continue;
        };
        keep.insert(name);
        keep.insert(info.url.clone());
        todo.extend(info.dependencies());
    }
    Ok(keep)
}

/// The systems of the manifests a host keeps (publish keeps three versions).
fn kept_systems(store: &dyn Store, host: &HostName) -> Result<Vec<StorePath>, CacheError> {
    let mut systems = Vec::new();
    for key in store.list(host, Area::Manifests).map_err(store_err)? {
        if !matches!(key, Key::Manifest(_)) {
            continue;
        }
        let bytes = store
            .get(host, &key, crate::protocol::manifest::MAX_MANIFEST_BYTES)
            .map_err(store_err)?;
        if let Some(system) = bytes.and_then(|b| Manifest::parse(&b).ok()?.system) {
            systems.push(system);
        }
    }
    Ok(systems)
}

/// Removes from each host's cache what none of its kept manifests' systems needs, then the
/// pooled files no host keeps any more. Returns how many files were removed.
pub fn collect(store: &dyn Store, state: &Chroot) -> Result<usize, CacheError> {
    let mut removed = 0;
    let mut kept_anywhere = BTreeSet::new();
    for host in store.hosts().map_err(store_err)? {
        let listed = store.list(&host, Area::Cache).map_err(store_err)?;
        if listed.is_empty() {
            continue;
        }
        let keep = reachable(store, &host, &kept_systems(store, &host)?)?;
        for key in listed {
            let Key::Cache(rel) = &key else { continue };
            if rel.as_str() != CACHE_INFO_FILE && !keep.contains(rel.as_str()) {
                store.delete(&host, &key).map_err(store_err)?;
                removed += 1;
            }
        }
        kept_anywhere.extend(keep);
    }
    let pool = pool_dir(state);
    if pool.is_dir() {
        for rel in files(&pool).map_err(io_err(&pool))? {
            if rel != CACHE_INFO_FILE && !kept_anywhere.contains(&rel) {
                let path = pool.join(&rel);
                fs::remove_file(&path).map_err(io_err(&path))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Files under `dir` (one level of subdirectories), as paths relative to it.
fn files(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            for sub in fs::read_dir(entry.path())? {
                let sub = sub?;
                if !sub.file_type()?.is_dir() {
                    out.push(format!("{name}/{}", sub.file_name().to_string_lossy()));
                }
            }
        } else {
            out.push(name);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_nix_secret_key_and_derives_its_public_half() {
        let tmp = tempfile::tempdir().unwrap();
        let sk = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        let mut secret = sk.to_bytes().to_vec();
        secret.extend_from_slice(sk.verifying_key().as_bytes());
        let path = tmp.path().join("key");
        fs::write(
            &path,
            format!("bento-1:{}", base64ct::Base64::encode_string(&secret)),
        )
        .unwrap();
        let key = CacheKey::load(&path).unwrap();
        assert_eq!(
            key.public,
            format!(
                "bento-1:{}",
                base64ct::Base64::encode_string(sk.verifying_key().as_bytes())
            )
        );
        fs::write(&path, "bento-1:AAAA").unwrap();
        assert!(CacheKey::load(&path)
            .unwrap_err()
            .to_string()
            .contains("64 bytes"));
    }
}
