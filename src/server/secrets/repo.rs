//! The admin's tools over the fleet repo's `.age` files: `show` (decrypt to stdout),
//! `edit` (decrypt, edit, re-encrypt) and `rekey` (re-encrypt to the current keys). A file
//! shared by several hosts (a symlink into a common directory) is encrypted to all of
//! them, so rewriting it for one host never locks another out. Plaintext only ever exists
//! in memory and in the editor's private temporary file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::{recipients_for, SecretsError};
use crate::protocol::secret::{self, Identities, Recipient, AGE_SUFFIX};
use crate::protocol::HostName;
use crate::server::fleet::{Fleet, FleetConfig, HostSource};
use crate::server::hostfiles::FILES_DIR;
use crate::server::snapshot::ItemKind;

/// A secret named on the command line, found in a host's files root.
#[derive(Debug, Clone)]
pub struct Secret {
    /// The `.age` file (or the plaintext file, when `plaintext`), as it would be written.
    pub file: PathBuf,
    pub exists: bool,
    pub plaintext: bool,
}

fn files_root(fleet: &Fleet, source: &HostSource) -> PathBuf {
    let root = fleet.root.join(&source.dir).join(FILES_DIR);
    match &source.files_prefix {
        Some(p) => root.join(p),
        None => root,
    }
}

fn find_host<'a>(
    sources: &'a [HostSource],
    host: &HostName,
) -> Result<&'a HostSource, SecretsError> {
    sources
        .iter()
        .find(|s| &s.name == host)
        .ok_or_else(|| SecretsError::UnknownHost(host.clone()))
}

/// Finds `path` (relative to the host's files root, with or without `.age`).
pub fn find_secret(
    fleet: &Fleet,
    sources: &[HostSource],
    host: &HostName,
    path: &str,
) -> Result<Secret, SecretsError> {
    let source = find_host(sources, host)?;
    let root = files_root(fleet, source);
    let rel = path.trim_start_matches('/');
    let age_rel = if rel.ends_with(AGE_SUFFIX) {
        rel.to_owned()
    } else {
        format!("{rel}{AGE_SUFFIX}")
    };
    if crate::protocol::manifest::RelPath::new(&age_rel).is_err() {
        return Err(SecretsError::NoFile {
            host: host.clone(),
            path: path.to_owned(),
            dir: root,
        });
    }
    let age_file = root.join(&age_rel);
    let plain_file = root.join(age_rel.strip_suffix(AGE_SUFFIX).unwrap_or(&age_rel));
    if age_file.exists() {
        return Ok(Secret {
            file: std::fs::canonicalize(&age_file).unwrap_or(age_file),
            exists: true,
            plaintext: false,
        });
    }
    if !rel.ends_with(AGE_SUFFIX) && plain_file.is_file() {
        return Ok(Secret {
            file: plain_file,
            exists: true,
            plaintext: true,
        });
    }
    Ok(Secret {
        file: age_file,
        exists: false,
        plaintext: false,
    })
}

/// Every `.age` file of the fleet (real path, symlinks resolved) with the hosts that use it.
fn age_files(fleet: &Fleet, sources: &[HostSource]) -> BTreeMap<PathBuf, BTreeSet<HostName>> {
    let mut out: BTreeMap<PathBuf, BTreeSet<HostName>> = BTreeMap::new();
    for s in sources {
        let root = match &s.files_prefix {
            Some(p) => format!("{FILES_DIR}/{p}/"),
            None => format!("{FILES_DIR}/"),
        };
        for item in s.items.iter() {
            if let ItemKind::File { source, .. } = &item.kind {
                if item.path.starts_with(&root) && item.path.ends_with(AGE_SUFFIX) {
                    let real =
                        std::fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
                    out.entry(real).or_default().insert(s.name.clone());
                }
            }
        }
    }
    let _ = fleet;
    out
}

/// The recipients of a file used by `hosts`: every host's key plus `[secrets] recipients`.
fn recipients_of(
    fleet: &FleetConfig,
    hosts: &BTreeSet<HostName>,
) -> Result<Vec<Recipient>, SecretsError> {
    let mut out: Vec<Recipient> = Vec::new();
    for h in hosts {
        for r in recipients_for(fleet, h)? {
            if !out.iter().any(|o| o.text == r.text) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

fn users_of(
    fleet: &Fleet,
    sources: &[HostSource],
    file: &Path,
    host: &HostName,
) -> BTreeSet<HostName> {
    let real = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_owned());
    let mut users = age_files(fleet, sources).remove(&real).unwrap_or_default();
    users.insert(host.clone());
    users
}

fn read(path: &Path) -> Result<Vec<u8>, SecretsError> {
    std::fs::read(path).map_err(|source| SecretsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn decrypt(
    ids: &Identities,
    file: &Path,
    identity: &Path,
    bytes: &[u8],
) -> Result<Vec<u8>, SecretsError> {
    ids.decrypt(bytes).map_err(|source| SecretsError::Decrypt {
        file: file.to_owned(),
        identity: identity.to_owned(),
        source,
    })
}

fn write(file: &Path, bytes: &[u8]) -> Result<(), SecretsError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| SecretsError::Io {
        path: file.to_owned(),
        source,
    };
    let mode = match std::fs::metadata(file) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(_) => 0o644,
    };
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    crate::sys::atomic::write_file(file, bytes, mode).map_err(io)
}

/// The plaintext of a host's secret (a `.age` file decrypted with `identity`, or a
/// plaintext file as it is).
pub fn show(
    fleet: &Fleet,
    sources: &[HostSource],
    host: &HostName,
    path: &str,
    identity: &Path,
) -> Result<Vec<u8>, SecretsError> {
    let s = find_secret(fleet, sources, host, path)?;
    if !s.exists {
        return Err(SecretsError::NoFile {
            host: host.clone(),
            path: path.to_owned(),
            dir: files_root(fleet, find_host(sources, host)?),
        });
    }
    let bytes = read(&s.file)?;
    if s.plaintext {
        return Ok(bytes);
    }
    let ids = Identities::load(identity).map_err(SecretsError::Identity)?;
    decrypt(&ids, &s.file, identity, &bytes)
}

/// What `edit` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditOutcome {
    Created,
    Updated,
    Unchanged,
}

/// Decrypts a host's `.age` file (or starts an empty one) into a private temporary file,
/// runs `editor` on it and encrypts the result to the host (every host using the file)
/// and `[secrets] recipients`.
pub fn edit(
    fleet: &Fleet,
    sources: &[HostSource],
    host: &HostName,
    path: &str,
    identity: &Path,
    editor: &dyn Fn(&Path) -> Result<(), SecretsError>,
) -> Result<(PathBuf, EditOutcome), SecretsError> {
    let s = find_secret(fleet, sources, host, path)?;
    if s.plaintext {
        return Err(SecretsError::IsPlaintext { file: s.file });
    }
    let recipients = recipients_of(&fleet.config, &users_of(fleet, sources, &s.file, host))?;
    let (old, armored, current) = if s.exists {
        let bytes = read(&s.file)?;
        let ids = Identities::load(identity).map_err(SecretsError::Identity)?;
        let plain = decrypt(&ids, &s.file, identity, &bytes)?;
        let current = secret::stanzas(&bytes)
            .map(|st| secret::is_exactly_for(&st, &recipients))
            .unwrap_or(false);
        (plain, secret::is_armored(&bytes), current)
    } else {
        (Vec::new(), true, false)
    };
    let dir = super::scratch::private_dir()?;
    let name = s
        .file
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(AGE_SUFFIX).to_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "secret".into());
    let tmp = dir.path().join(name);
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| SecretsError::Io {
                path: tmp.clone(),
                source,
            })?;
        std::io::Write::write_all(&mut f, &old).map_err(|source| SecretsError::Io {
            path: tmp.clone(),
            source,
        })?;
    }
    editor(&tmp)?;
    let new = read(&tmp)?;
    drop(dir);
    if s.exists && new == old && current {
        return Ok((s.file, EditOutcome::Unchanged));
    }
    let ct =
        secret::encrypt(&new, &recipients, armored).map_err(|source| SecretsError::Encrypt {
            file: s.file.clone(),
            host: host.clone(),
            source,
        })?;
    write(&s.file, &ct)?;
    Ok((
        s.file,
        if s.exists {
            EditOutcome::Updated
        } else {
            EditOutcome::Created
        },
    ))
}

/// What `encrypt` did.
#[derive(Debug, Clone)]
pub struct Encrypted {
    /// The plaintext file, now removed.
    pub plaintext: PathBuf,
    /// The `.age` file written in its place.
    pub file: PathBuf,
    /// The hosts it is encrypted to (besides `[secrets] recipients`).
    pub hosts: BTreeSet<HostName>,
    /// files.toml, when its key for the file was renamed to the `.age` name.
    pub toml: Option<PathBuf>,
}

/// Turns a host's plaintext `files/` entry into an `.age` file encrypted to every host that
/// uses it and `[secrets] recipients`, renames its files.toml key (owner, group and mode
/// follow it), and removes the plaintext. Everything is checked and computed first, so a
/// refusal writes nothing.
pub fn encrypt(
    fleet: &Fleet,
    sources: &[HostSource],
    host: &HostName,
    path: &str,
) -> Result<Encrypted, SecretsError> {
    let source = find_host(sources, host)?;
    let s = find_secret(fleet, sources, host, path.trim_end_matches(AGE_SUFFIX))?;
    if !s.exists {
        return Err(SecretsError::NoFile {
            host: host.clone(),
            path: path.to_owned(),
            dir: files_root(fleet, source),
        });
    }
    let refuse = |why: String| SecretsError::CannotEncrypt {
        file: s.file.clone(),
        why,
    };
    if !s.plaintext {
        return Err(refuse(
            "already encrypted (`bento secret edit` changes it, `bento secret rekey` re-encrypts it)"
                .into(),
        ));
    }
    let meta = std::fs::symlink_metadata(&s.file).map_err(|source| SecretsError::Io {
        path: s.file.clone(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        let target = std::fs::canonicalize(&s.file).unwrap_or_else(|_| s.file.clone());
        return Err(refuse(format!(
            "a link to {}: encrypt that file, then point the link at its .age name",
            target.display()
        )));
    }
    let age = PathBuf::from(format!("{}{AGE_SUFFIX}", s.file.display()));
    if std::fs::symlink_metadata(&age).is_ok() {
        return Err(refuse(format!("{} exists already", age.display())));
    }
    // Every host whose tree reaches this file (a link from another host's files/).
    let real = std::fs::canonicalize(&s.file).unwrap_or_else(|_| s.file.clone());
    let mut hosts: BTreeSet<HostName> = sources
        .iter()
        .filter(|src| {
            src.items.iter().any(|i| match &i.kind {
                ItemKind::File { source, .. } => {
                    std::fs::canonicalize(source).is_ok_and(|p| p == real)
                }
                _ => false,
            })
        })
        .map(|src| src.name.clone())
        .collect();
    hosts.insert(host.clone());
    let recipients = recipients_of(&fleet.config, &hosts)?;
    let plain = read(&s.file)?;
    let ct = secret::encrypt(&plain, &recipients, true).map_err(|e| SecretsError::Encrypt {
        file: s.file.clone(),
        host: host.clone(),
        source: e,
    })?;
    // files.toml keys name the file under files/ (with the host prefix in a flake
    // directory); the `.age` file is keyed by its own name.
    let root = files_root(fleet, source);
    let rel = s
        .file
        .strip_prefix(&root)
        .map(|r| r.to_string_lossy().into_owned())
        .unwrap_or_default();
    let key = match &source.files_prefix {
        Some(p) => format!("{p}/{rel}"),
        None => rel,
    };
    let toml_path = fleet
        .root
        .join(&source.dir)
        .join(crate::server::hostfiles::FILES_TOML);
    let toml = rename_key(&toml_path, &key, &format!("{key}{AGE_SUFFIX}"))?;

    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    crate::sys::atomic::write_file(&age, &ct, mode).map_err(|source| SecretsError::Io {
        path: age.clone(),
        source,
    })?;
    let toml = match toml {
        Some((path, text)) => {
            write(&path, text.as_bytes())?;
            Some(path)
        }
        None => None,
    };
    std::fs::remove_file(&s.file).map_err(|source| SecretsError::Io {
        path: s.file.clone(),
        source,
    })?;
    Ok(Encrypted {
        plaintext: s.file,
        file: age,
        hosts,
        toml,
    })
}

/// files.toml (its real path) with the table `from` renamed to `to`, comments and layout
/// kept; `None` when there is no files.toml or no such key.
fn rename_key(
    toml_path: &Path,
    from: &str,
    to: &str,
) -> Result<Option<(PathBuf, String)>, SecretsError> {
    let path = match std::fs::canonicalize(toml_path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SecretsError::Io {
                path: toml_path.to_owned(),
                source,
            })
        }
    };
    let text = String::from_utf8_lossy(&read(&path)?).into_owned();
    let bad = |message: String| SecretsError::Io {
        path: path.clone(),
        source: std::io::Error::other(message),
    };
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| bad(format!("{e}")))?;
    if doc.contains_key(to) {
        return Err(bad(format!("has a key {to:?} already")));
    }
    let Some(item) = doc.remove(from) else {
        return Ok(None);
    };
    doc.insert(to, item);
    Ok(Some((path, doc.to_string())))
}

/// What `rekey` did to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RekeyOutcome {
    /// Re-encrypted to the current recipients.
    Rekeyed,
    /// Already encrypted to exactly the current recipients.
    UpToDate,
}

#[derive(Debug, Default)]
pub struct RekeyReport {
    pub files: Vec<(PathBuf, BTreeSet<HostName>, RekeyOutcome)>,
    /// Plaintext entries of the selected hosts (publish encrypts them with `encrypt = true`).
    pub plaintext: usize,
}

/// Re-encrypts every `.age` file the hosts in `only` use (all when empty) to its hosts'
/// current keys and `[secrets] recipients`. A file already for exactly those keys is left
/// alone unless `force` (an `age1…` recipient swapped for another cannot be told from its
/// header).
pub fn rekey(
    fleet: &Fleet,
    sources: &[HostSource],
    only: &[HostName],
    identity: &Path,
    force: bool,
) -> Result<RekeyReport, SecretsError> {
    let mut report = RekeyReport::default();
    let mut ids: Option<Identities> = None;
    for (file, hosts) in age_files(fleet, sources) {
        if !only.is_empty() && !hosts.iter().any(|h| only.contains(h)) {
            continue;
        }
        let recipients = recipients_of(&fleet.config, &hosts)?;
        let bytes = read(&file)?;
        let st = secret::stanzas(&bytes).map_err(|source| SecretsError::NotAge {
            file: file.clone(),
            host: hosts.iter().next().cloned().expect("a user"),
            source,
        })?;
        if !force && secret::is_exactly_for(&st, &recipients) {
            report.files.push((file, hosts, RekeyOutcome::UpToDate));
            continue;
        }
        let ids = match &mut ids {
            Some(i) => i,
            None => ids.insert(Identities::load(identity).map_err(SecretsError::Identity)?),
        };
        let plain = decrypt(ids, &file, identity, &bytes)?;
        let host = hosts.iter().next().cloned().expect("a user");
        let ct =
            secret::encrypt(&plain, &recipients, secret::is_armored(&bytes)).map_err(|source| {
                SecretsError::Encrypt {
                    file: file.clone(),
                    host,
                    source,
                }
            })?;
        write(&file, &ct)?;
        report.files.push((file, hosts, RekeyOutcome::Rekeyed));
    }
    for s in sources
        .iter()
        .filter(|s| only.is_empty() || only.contains(&s.name))
    {
        let root = match &s.files_prefix {
            Some(p) => format!("{FILES_DIR}/{p}/"),
            None => format!("{FILES_DIR}/"),
        };
        report.plaintext += s
            .items
            .iter()
            .filter(|i| matches!(i.kind, ItemKind::File { .. }))
            .filter(|i| i.path.starts_with(&root) && !i.path.ends_with(AGE_SUFFIX))
            .count();
    }
    Ok(report)
}

/// True when `name` matches `pattern` (`*` any run of characters, `?` one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("web-*", "web-1"));
        assert!(glob_match("*", "alpha"));
        assert!(glob_match("a?pha", "alpha"));
        assert!(glob_match("alpha", "alpha"));
        assert!(!glob_match("web-*", "db-1"));
        assert!(!glob_match("a?", "alpha"));
    }
}
