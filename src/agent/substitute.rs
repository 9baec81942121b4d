//! Prebuilt delivery, the agent's side (docs/delivery.md): a version whose manifest names a
//! `system` the server built and exported into `cache/` is realised without evaluating. The
//! agent asks its store which closure paths it lacks (level by level, one Nix call per
//! level), reads only their narinfos over its one connection (each level's concurrently,
//! at most `source::PARALLEL_FETCHES` in flight), checks every signature
//! against `cache_keys` *before* fetching any NAR, downloads only the missing NARs into a
//! local file cache under the state directory (resumable; `FileSize` bounded by the signed
//! `NarSize` and the free space checked before any download; size and `FileHash` checked,
//! then each NAR decompressed and checked against the signed `NarSize`/`NarHash`: `nar`), and
//! hands exactly those paths to Nix, which checks hashes and signatures again on import.
//!
//! Invariant: nothing here changes the machine. Every refusal (no `cache_keys`, a narinfo
//! missing, unsigned or signed by another key, a NAR that does not match its narinfo) happens
//! before `Host::realise`, and its message names the store path and the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::host::{Host, Realise};
use super::nar::{self, NarError};
use super::source::{CacheFile, Item, ObjectPart, RemoteError, Source};
use crate::nix::{NixError, StorePath};
use crate::protocol::layout;
use crate::protocol::manifest::Manifest;
use crate::protocol::narinfo::{self, CacheKeys, NarInfo, NarInfoError, MAX_NARINFO_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum SubstituteError {
    #[error("{system} is prebuilt by the server (cache/ has its narinfo), but agent.toml has no cache_keys to check it with; add the server's public cache key (`nix key convert-secret-to-public < cache_key`)")]
    NoKeys { system: StorePath },
    #[error("cache_keys in agent.toml: {0}")]
    BadKeys(NarInfoError),
    #[error("{path}: missing from the server's cache (no {item})")]
    Missing { path: String, item: String },
    #[error("{path}: {source}")]
    Bad { path: String, source: NarInfoError },
    #[error("{path}: the narinfo's URL {url:?} is not a NAR file name of cache/; refusing it")]
    BadUrl { path: String, url: String },
    #[error("{path}: the narinfo gives no FileSize; refusing an unbounded download")]
    NoSize { path: String },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("{path}: {source}")]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("asking the store which paths it has: {0}")]
    Nix(#[from] NixError),
    #[error("NAR file of {path}: {source}")]
    Nar { path: String, source: NarError },
    #[error("not enough free space in {}: the missing NARs need {needed} bytes, {free} are free; nothing was downloaded", dir.display())]
    NoSpace {
        dir: PathBuf,
        needed: u64,
        free: u64,
    },
}

/// What [`prepare`] did: the realisation to hand to the host, and counts for the log.
#[derive(Debug)]
pub struct Prepared {
    pub realise: Realise,
    pub narinfos: usize,
    pub nar_bytes: u64,
}

/// The manifest's `system` when the server built it for this host: named, and `cache/`
/// holds its narinfo (one stat). `None` for a version the host builds itself.
pub fn prebuilt(
    src: &mut dyn Source,
    manifest: &Manifest,
) -> Result<Option<StorePath>, RemoteError> {
    let Some(system) = &manifest.system else {
        return Ok(None);
    };
    let Some(file) = CacheFile::narinfo(narinfo::hash_part(system.as_str())) else {
        return Ok(None);
    };
    Ok(src.size(Item::Cache(file))?.map(|_| system.clone()))
}

/// Fetches what the store lacks of `system`'s closure into `cache` (the local file binary
/// cache) and returns how to import it. `keys` are agent.toml's `cache_keys`.
pub fn prepare(
    src: &mut dyn Source,
    host: &dyn Host,
    keys: &[String],
    system: &StorePath,
    cache: &Path,
    step: &mut dyn FnMut(&str),
) -> Result<Prepared, SubstituteError> {
    if keys.is_empty() {
        return Err(SubstituteError::NoKeys {
            system: system.clone(),
        });
    }
    let trusted = CacheKeys::parse(keys).map_err(SubstituteError::BadKeys)?;
    let missing = walk(src, host, &trusted, system)?;
    step(&format!(
        "the store lacks {} path(s) of {system}'s closure; their narinfos are signed by a trusted cache key",
        missing.len()
    ));
    let local = |path: &Path| {
        let path = path.to_owned();
        move |source| SubstituteError::Local { path, source }
    };
    let nar_dir = cache.join("nar");
    std::fs::create_dir_all(&nar_dir).map_err(local(&nar_dir))?;
    let nar_bytes = fetch_nars(src, &missing, cache)?;
    // Nix reads the narinfos (as the server signed them) and nix-cache-info from here.
    for (info, text) in &missing {
        let path = cache.join(CacheFile::narinfo(info.hash_part()).expect("parsed").rel());
        crate::sys::atomic::write_file(&path, text.as_bytes(), 0o600).map_err(local(&path))?;
    }
    let info_path = cache.join(layout::CACHE_INFO);
    crate::sys::atomic::write_file(&info_path, narinfo::CACHE_INFO.as_bytes(), 0o600)
        .map_err(local(&info_path))?;
    let paths = missing
        .iter()
        .map(|(i, _)| StorePath::new(&i.store_path).expect("a parsed narinfo's store path"))
        .collect();
    Ok(Prepared {
        realise: Realise::Substitute {
            system: system.clone(),
            cache: cache.to_owned(),
            paths,
            keys: keys.to_vec(),
        },
        narinfos: missing.len(),
        nar_bytes,
    })
}

/// Breadth first from `system`: each level's paths are checked against the store in one
/// call; the narinfos of the missing ones are read concurrently (one batch per level over
/// the one connection, bounded by the backend), then each is parsed, matched to its path
/// and verified in order, and their references form the next level. No NAR is fetched here.
fn walk(
    src: &mut dyn Source,
    host: &dyn Host,
    keys: &CacheKeys,
    system: &StorePath,
) -> Result<Vec<(NarInfo, String)>, SubstituteError> {
    let mut found: BTreeMap<String, (NarInfo, String)> = BTreeMap::new();
    let mut seen = BTreeSet::from([system.clone()]);
    let mut level = vec![system.clone()];
    while !level.is_empty() {
        let valid = host.valid_paths(&level)?;
        let missing: Vec<&StorePath> = level.iter().filter(|p| !valid.contains(*p)).collect();
        let mut next = Vec::new();
        for (path, (info, text)) in missing.iter().zip(read_narinfos(src, &missing)?) {
            info.verify(keys).map_err(|source| SubstituteError::Bad {
                path: path.to_string(),
                source,
            })?;
            for dep in info.dependencies() {
                let dep = StorePath::new(&dep).map_err(|_| SubstituteError::Bad {
                    path: path.to_string(),
                    source: NarInfoError::Invalid {
                        field: "References",
                        value: dep.clone(),
                    },
                })?;
                if seen.insert(dep.clone()) {
                    next.push(dep);
                }
            }
            found.insert(path.to_string(), (info, text));
        }
        level = next;
    }
    Ok(found.into_values().collect())
}

/// The narinfos of `paths`, in order, read in one concurrent batch, each parsed and checked
/// to describe its path (not yet verified). At most [`MAX_NARINFO_BYTES`] of each is read.
fn read_narinfos(
    src: &mut dyn Source,
    paths: &[&StorePath],
) -> Result<Vec<(NarInfo, String)>, SubstituteError> {
    let items = paths
        .iter()
        .map(|path| {
            let file = CacheFile::narinfo(narinfo::hash_part(path.as_str()));
            file.map(Item::Cache).ok_or_else(|| SubstituteError::Bad {
                path: path.to_string(),
                source: NarInfoError::Invalid {
                    field: "StorePath",
                    value: path.to_string(),
                },
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let texts = match src.read_many(&items, MAX_NARINFO_BYTES as u64) {
        Ok(t) => t,
        Err(RemoteError::TooLarge { path: file, .. }) => {
            let at = items.iter().position(|i| i.path() == file);
            return Err(SubstituteError::Bad {
                path: at.map_or(file, |i| paths[i].to_string()),
                source: NarInfoError::TooLarge(MAX_NARINFO_BYTES + 1),
            });
        }
        Err(e) => return Err(e.into()),
    };
    paths
        .iter()
        .zip(&items)
        .zip(texts)
        .map(|((path, item), bytes)| parse_narinfo(path, *item, bytes))
        .collect()
}

/// One narinfo's bytes (`None`: not on the server), parsed and checked to describe `path`.
fn parse_narinfo(
    path: &StorePath,
    item: Item,
    bytes: Option<Vec<u8>>,
) -> Result<(NarInfo, String), SubstituteError> {
    let Some(bytes) = bytes else {
        return Err(SubstituteError::Missing {
            path: path.to_string(),
            item: item.path(),
        });
    };
    let bad = |source| SubstituteError::Bad {
        path: path.to_string(),
        source,
    };
    let text = String::from_utf8(bytes).map_err(|_| {
        bad(NarInfoError::Line {
            line: 0,
            problem: "not UTF-8".into(),
        })
    })?;
    let info = NarInfo::parse(&text).map_err(bad)?;
    if info.store_path != path.as_str() {
        return Err(bad(NarInfoError::WrongPath {
            wanted: path.to_string(),
            got: info.store_path,
        }));
    }
    Ok((info, text))
}

/// Downloads the NAR file of every narinfo into `cache/<URL>`, resuming a partial file an
/// earlier run left, and checks each against `FileSize` and `FileHash`; a bad one is deleted
/// so the next run fetches it afresh. Returns the bytes moved.
fn fetch_nars(
    src: &mut dyn Source,
    infos: &[(NarInfo, String)],
    cache: &Path,
) -> Result<u64, SubstituteError> {
    let mut parts = Vec::new();
    let mut checks = Vec::new();
    let mut files = Vec::new();
    for (info, _) in infos {
        let path = info.store_path.clone();
        let file = CacheFile::nar(&info.url).ok_or_else(|| SubstituteError::BadUrl {
            path: path.clone(),
            url: info.url.clone(),
        })?;
        let size = info
            .file_size
            .ok_or_else(|| SubstituteError::NoSize { path: path.clone() })?;
        // `FileSize` is not signed: bound it by the signed `NarSize` before any download.
        nar::check_file_size(info, size).map_err(|source| SubstituteError::Nar {
            path: path.clone(),
            source,
        })?;
        files.push((file, size));
    }
    // Every NAR's size in one concurrent batch, before any download.
    let items: Vec<Item> = files.iter().map(|(f, _)| Item::Cache(*f)).collect();
    let sizes = src.size_many(&items)?;
    for (((info, _), (file, size)), on_server) in infos.iter().zip(files).zip(sizes) {
        let path = info.store_path.clone();
        match on_server {
            None => {
                return Err(SubstituteError::Missing {
                    path,
                    item: Item::Cache(file).path(),
                })
            }
            Some(n) if n != size => {
                return Err(SubstituteError::Bad {
                    path: path.clone(),
                    source: NarInfoError::File {
                        store_path: path,
                        problem: format!("{n} bytes on the server, the narinfo says {size}"),
                    },
                })
            }
            Some(_) => {}
        }
        let dest = cache.join(file.rel());
        let partial = cache.join(format!("nar/.partial-{}", &file.rel()["nar/".len()..]));
        if dest.exists() && check(info, &dest).is_ok() && nar::check(info, &dest).is_ok() {
            continue;
        }
        let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        // One byte past the promised size is asked for, so an oversized file fails its
        // check instead of being cut to size.
        if have <= size {
            parts.push(ObjectPart {
                item: Item::Cache(file),
                from: have,
                max: size + 1 - have,
                dest: partial.clone(),
            });
        }
        checks.push((info, partial, dest));
    }
    let needed: u64 = parts.iter().map(|p| p.max).sum();
    let nar_dir = cache.join("nar");
    let free = free_bytes(&nar_dir).map_err(|source| SubstituteError::Local {
        path: nar_dir.clone(),
        source,
    })?;
    if needed > free {
        return Err(SubstituteError::NoSpace {
            dir: nar_dir,
            needed,
            free,
        });
    }
    let fetched = src.read_objects(&parts)?;
    for (info, partial, dest) in checks {
        let checked = check(info, &partial).and_then(|()| {
            nar::check(info, &partial).map_err(|source| SubstituteError::Nar {
                path: info.store_path.clone(),
                source,
            })
        });
        if let Err(e) = checked {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, &dest).map_err(|source| SubstituteError::Local {
            path: dest.clone(),
            source,
        })?;
    }
    Ok(fetched)
}

/// Bytes an unprivileged write may still take on the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

fn check(info: &NarInfo, file: &Path) -> Result<(), SubstituteError> {
    let local = |source| SubstituteError::Local {
        path: file.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(file).map_err(local)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(local)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    info.check_file(&hasher.finalize().into(), size)
        .map_err(|source| SubstituteError::Bad {
            path: info.store_path.clone(),
            source,
        })
}

/// Empties the local cache once its paths are in the store (they are of no further use),
/// keeping nothing from earlier versions.
pub fn prune(cache: &Path) {
    if let Err(e) = std::fs::remove_dir_all(cache) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot empty {}: {e}", cache.display());
        }
    }
}
