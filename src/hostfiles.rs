//! Splitting a host's tree into the Nix configuration it builds and the files installed
//! verbatim outside the Nix store (`files/`, described by an optional `files.toml`).
//! Nothing under `files/` ever lands in `config`: config ends up in the world-readable store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::manifest::{ConfigEntry, Digest, FileEntry, Mode, RelPath, TargetPath};
use crate::snapshot::{Item, ItemKind};

pub const FILES_DIR: &str = "files";
pub const FILES_TOML: &str = "files.toml";
pub const DEFAULT_MODE: Mode = Mode(0o600);

#[derive(Debug, thiserror::Error)]
pub enum HostFilesError {
    #[error("{path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("{toml}: [{key:?}] names no file under {files_dir}")]
    UnknownKey {
        toml: PathBuf,
        key: String,
        files_dir: PathBuf,
    },
    #[error("{toml}: [{key:?}] {message}")]
    BadSpec {
        toml: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: unsafe path in the fleet repo: {reason}")]
    Path { path: PathBuf, reason: String },
    #[error("{dir}: two files install to {target}: {first} and {second}")]
    SameTarget {
        dir: PathBuf,
        target: String,
        first: String,
        second: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    target: Option<String>,
    owner: Option<String>,
    group: Option<String>,
    mode: Option<String>,
}

/// A host's content, ready for a manifest, with where each object's bytes come from.
#[derive(Debug, Clone)]
pub struct HostContent {
    pub config: Vec<ConfigEntry>,
    pub files: Vec<FileEntry>,
    pub sources: BTreeMap<Digest, Arc<Path>>,
}

/// True for paths of a host tree that are installed verbatim and never enter the store.
pub fn is_host_file(path: &str) -> bool {
    path == FILES_TOML || path == FILES_DIR || path.starts_with("files/")
}

/// Splits `items` (the host directory's tree). `files_prefix` is `Some(host)` in a flake
/// directory shared by several hosts, where each host's files live under `files/<host>/`.
/// `dir` is the host directory as shown to the user.
pub fn split(
    items: &[Item],
    files_prefix: Option<&str>,
    dir: &Path,
) -> Result<HostContent, HostFilesError> {
    let mut config = Vec::new();
    let mut sources = BTreeMap::new();
    let mut file_items: BTreeMap<String, (u64, Digest)> = BTreeMap::new();
    let mut toml_source = None;
    let files_root = match files_prefix {
        Some(p) => format!("{FILES_DIR}/{p}/"),
        None => format!("{FILES_DIR}/"),
    };
    let bad_path = |p: &str, reason: String| HostFilesError::Path {
        path: dir.join(p),
        reason,
    };
    for item in items {
        let p = item.path.as_str();
        if p == FILES_TOML {
            if let ItemKind::File { source, .. } = &item.kind {
                toml_source = Some(source.clone());
            }
            continue;
        }
        if p == FILES_DIR || p.starts_with(&format!("{FILES_DIR}/")) {
            if let (
                Some(rel),
                ItemKind::File {
                    source,
                    size,
                    sha256,
                    ..
                },
            ) = (p.strip_prefix(&files_root), &item.kind)
            {
                file_items.insert(rel.to_owned(), (*size, *sha256));
                sources.insert(*sha256, source.clone());
            }
            continue;
        }
        let path = RelPath::new(p).map_err(|e| bad_path(p, e.to_string()))?;
        config.push(match &item.kind {
            ItemKind::Dir => ConfigEntry::Directory { path },
            ItemKind::File {
                source,
                size,
                sha256,
                executable,
            } => {
                sources.insert(*sha256, source.clone());
                ConfigEntry::File {
                    path,
                    size: *size,
                    sha256: *sha256,
                    executable: *executable,
                }
            }
        });
    }

    let toml_path = dir.join(FILES_TOML);
    let mut specs: BTreeMap<String, FileSpec> = match &toml_source {
        Some(src) => {
            let text = std::fs::read_to_string(src).map_err(|e| HostFilesError::Toml {
                path: toml_path.clone(),
                message: e.to_string(),
            })?;
            toml::from_str(&text).map_err(|e| HostFilesError::Toml {
                path: toml_path.clone(),
                message: e.to_string().trim_end().to_owned(),
            })?
        }
        None => BTreeMap::new(),
    };
    // In a shared flake directory files.toml keys carry the host prefix ("alpha/etc/x");
    // keys for other hosts are theirs to check.
    let key_prefix = files_prefix.map(|p| format!("{p}/")).unwrap_or_default();
    for key in specs.keys() {
        let mine = key.starts_with(&key_prefix);
        if mine && !file_items.contains_key(&key[key_prefix.len()..]) {
            return Err(HostFilesError::UnknownKey {
                toml: toml_path.clone(),
                key: key.clone(),
                files_dir: dir.join(FILES_DIR),
            });
        }
    }

    let mut files = Vec::new();
    let mut targets: BTreeMap<String, String> = BTreeMap::new();
    for (rel, (size, sha256)) in file_items {
        let spec = specs
            .remove(&format!("{key_prefix}{rel}"))
            .unwrap_or_default();
        let bad = |message: String| HostFilesError::BadSpec {
            toml: toml_path.clone(),
            key: format!("{key_prefix}{rel}"),
            message,
        };
        let path = RelPath::new(&rel)
            .map_err(|e| bad_path(&format!("{files_root}{rel}"), e.to_string()))?;
        let target_text = spec.target.unwrap_or_else(|| format!("/{rel}"));
        let target = TargetPath::new(&target_text).map_err(|_| {
            bad(format!(
                "target {target_text:?} must be an absolute path without '.' or '..' parts"
            ))
        })?;
        let mode = match spec.mode {
            Some(m) => m.parse::<Mode>().map_err(&bad)?,
            None => DEFAULT_MODE,
        };
        let owner = spec.owner.unwrap_or_else(|| "root".into());
        let group = spec.group.unwrap_or_else(|| "root".into());
        for (what, v) in [("owner", &owner), ("group", &group)] {
            if !is_account_name(v) {
                return Err(bad(format!(
                    "{what} {v:?} is not a user/group name or number"
                )));
            }
        }
        if let Some(first) = targets.insert(target.to_string(), rel.clone()) {
            return Err(HostFilesError::SameTarget {
                dir: dir.to_owned(),
                target: target.to_string(),
                first,
                second: rel,
            });
        }
        files.push(FileEntry {
            path,
            target,
            size,
            sha256,
            owner,
            group,
            mode,
        });
    }
    Ok(HostContent {
        config,
        files,
        sources,
    })
}

/// A Unix user or group name (`[a-z_][a-z0-9_-]*`, optional trailing `$`) or a number.
fn is_account_name(s: &str) -> bool {
    if !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    let body = s.strip_suffix('$').unwrap_or(s);
    let mut chars = body.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && s.len() <= 32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &[u8]) -> Item {
        Item {
            path: path.into(),
            kind: ItemKind::File {
                source: Arc::from(Path::new("/nonexistent")),
                size: content.len() as u64,
                sha256: Digest::of(content),
                executable: false,
            },
        }
    }

    fn dir(path: &str) -> Item {
        Item {
            path: path.into(),
            kind: ItemKind::Dir,
        }
    }

    #[test]
    fn secrets_never_reach_config() {
        let items = vec![
            file("configuration.nix", b"c"),
            dir("files"),
            dir("files/etc"),
            file("files/etc/secret", b"s"),
        ];
        let c = split(&items, None, Path::new("hosts/a")).unwrap();
        assert_eq!(c.config.len(), 1);
        assert_eq!(c.files.len(), 1);
        let f = &c.files[0];
        assert_eq!(f.target.as_str(), "/etc/secret");
        assert_eq!(
            (f.owner.as_str(), f.group.as_str(), f.mode),
            ("root", "root", Mode(0o600))
        );
    }

    #[test]
    fn flake_dirs_give_each_host_its_own_files() {
        let items = vec![
            file("flake.nix", b"f"),
            dir("files"),
            dir("files/alpha"),
            file("files/alpha/a", b"a"),
            dir("files/beta"),
            file("files/beta/b", b"b"),
        ];
        let a = split(&items, Some("alpha"), Path::new("hosts/multi")).unwrap();
        assert_eq!(a.files.len(), 1);
        assert_eq!(a.files[0].target.as_str(), "/a");
        assert!(!a.sources.contains_key(&Digest::of(b"b")));
    }

    #[test]
    fn spec_errors_name_the_key() {
        let toml = tempfile::NamedTempFile::new().unwrap();
        let items = |t: &str| {
            std::fs::write(toml.path(), t).unwrap();
            vec![
                Item {
                    path: FILES_TOML.into(),
                    kind: ItemKind::File {
                        source: Arc::from(toml.path()),
                        size: 0,
                        sha256: Digest::of(b""),
                        executable: false,
                    },
                },
                dir("files"),
                file("files/key", b"k"),
            ]
        };
        let ok = split(
            &items("[key]\nmode = \"0640\"\ngroup = \"wheel\"\ntarget = \"/etc/k\"\n"),
            None,
            Path::new("hosts/a"),
        )
        .unwrap();
        assert_eq!(ok.files[0].mode, Mode(0o640));
        assert_eq!(ok.files[0].target.as_str(), "/etc/k");
        for (text, needle) in [
            ("[nope]\n", "nope"),
            ("[key]\nmode = \"999\"\n", "invalid mode"),
            ("[key]\ntarget = \"etc/k\"\n", "absolute"),
            ("[key]\ntarget = \"/etc/../k\"\n", "absolute"),
            ("[key]\nowner = \"a b\"\n", "owner"),
            ("[key]\ncolour = 1\n", "colour"),
        ] {
            let err = split(&items(text), None, Path::new("hosts/a"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.contains("files.toml"), "{text}: {err}");
        }
    }
}
