//! Flake lock files of the fleet (`bento flake-update`): updating them with Nix and saying,
//! per input, what changed between the lock before and after.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::nix::{Nix, NixError};

pub const LOCK_FILE: &str = "flake.lock";

/// What happened to one input of a lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InputChange {
    pub input: String,
    pub change: ChangeKind,
    /// Short descriptions of the locked source before and after (rev or narHash, date).
    pub before: Option<String>,
    pub after: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Removed,
    Updated,
}

/// The locked nodes of a lock file by name (without `root`); empty for no or a bad file.
fn locked_nodes(text: Option<&str>) -> BTreeMap<String, serde_json::Value> {
    let Some(v) = text.and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok()) else {
        return BTreeMap::new();
    };
    let root = v
        .get("root")
        .and_then(|r| r.as_str())
        .unwrap_or("root")
        .to_owned();
    v.get("nodes")
        .and_then(|n| n.as_object())
        .map(|nodes| {
            nodes
                .iter()
                .filter(|(name, _)| **name != root)
                .map(|(name, node)| {
                    (
                        name.clone(),
                        node.get("locked").cloned().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The names of the root's inputs in a lock file.
pub fn root_inputs(text: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return Vec::new();
    };
    let root = v.get("root").and_then(|r| r.as_str()).unwrap_or("root");
    v.pointer(&format!("/nodes/{root}/inputs"))
        .and_then(|i| i.as_object())
        .map(|i| i.keys().cloned().collect())
        .unwrap_or_default()
}

/// `rev 1a2b3c4 (2026-11-25)` or `sha256-Kz7d0+VY3MRw (2026-11-25)`.
fn describe(locked: &serde_json::Value) -> String {
    let date = locked
        .get("lastModified")
        .and_then(|t| t.as_u64())
        .map(|t| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t);
            humantime::format_rfc3339_seconds(t).to_string()[..10].to_owned()
        });
    let id = if let Some(rev) = locked.get("rev").and_then(|r| r.as_str()) {
        format!("rev {}", &rev[..rev.len().min(7)])
    } else if let Some(h) = locked.get("narHash").and_then(|h| h.as_str()) {
        h.chars().take(19).collect()
    } else {
        "?".to_owned()
    };
    match date {
        Some(d) => format!("{id} ({d})"),
        None => id,
    }
}

/// What changed between two lock files (either may be absent).
pub fn changes(before: Option<&str>, after: Option<&str>) -> Vec<InputChange> {
    let (b, a) = (locked_nodes(before), locked_nodes(after));
    let mut names: Vec<&String> = b.keys().chain(a.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| {
            let (old, new) = (b.get(name), a.get(name));
            let change = match (old, new) {
                (None, Some(_)) => ChangeKind::Added,
                (Some(_), None) => ChangeKind::Removed,
                (Some(o), Some(n)) if o != n => ChangeKind::Updated,
                _ => return None,
            };
            Some(InputChange {
                input: name.clone(),
                change,
                before: old.map(describe),
                after: new.map(describe),
            })
        })
        .collect()
}

/// Updates the lock file of the fleet's flake directory `dir` like `update`, but on a copy
/// of its resolved tree without `files/` and `files.toml`: Nix copies a `path:` flake into
/// the store whole, and secrets must never reach the world-readable store. The new lock file
/// is copied back atomically.
pub fn update_fleet_dir(
    nix: &Nix,
    scanner: &crate::server::snapshot::Scanner,
    dir: &Path,
    input: Option<&str>,
) -> Result<Vec<InputChange>, NixError> {
    let io = |e: &dyn std::fmt::Display| NixError::Output {
        argv: "(copying the flake without its secrets)".into(),
        message: e.to_string(),
    };
    let items = scanner.scan(dir).map_err(|e| io(&e))?;
    let config: Vec<crate::server::snapshot::Item> = items
        .iter()
        .filter(|i| !crate::server::hostfiles::is_host_file(&i.path))
        .cloned()
        .collect();
    let tmp = tempfile::Builder::new()
        .prefix("bento-flake-update-")
        .tempdir()
        .map_err(|e| io(&e))?;
    crate::server::fleet::materialize(&config, tmp.path()).map_err(|e| io(&e))?;
    let before = std::fs::read_to_string(dir.join(LOCK_FILE)).ok();
    update(nix, tmp.path(), input)?;
    let after = std::fs::read_to_string(tmp.path().join(LOCK_FILE)).ok();
    if let Some(lock) = &after {
        if after != before {
            crate::sys::atomic::write_file(&dir.join(LOCK_FILE), lock.as_bytes(), 0o644)
                .map_err(|e| io(&e))?;
        }
    }
    Ok(changes(before.as_deref(), after.as_deref()))
}

/// Updates the lock file of the flake in `dir` (all inputs, or `input`), read as a `path:`
/// flake so untracked files count and no git metadata is needed. Returns what changed.
pub fn update(nix: &Nix, dir: &Path, input: Option<&str>) -> Result<Vec<InputChange>, NixError> {
    let lock = dir.join(LOCK_FILE);
    let before = std::fs::read_to_string(&lock).ok();
    nix.flake_update(dir, input)?;
    let after = std::fs::read_to_string(&lock).ok();
    Ok(changes(before.as_deref(), after.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(common_hash: &str, extra: bool) -> String {
        let extra_node = if extra {
            r#","nixpkgs":{"locked":{"rev":"0123456789abcdef","lastModified":1700000000,"type":"github"}}"#
        } else {
            ""
        };
        format!(
            r#"{{"nodes":{{"common":{{"flake":false,"locked":{{"lastModified":1795655305,"narHash":"{common_hash}","path":"/x","type":"path"}}}}{extra_node},"root":{{"inputs":{{"common":"common"}}}}}},"root":"root","version":7}}"#
        )
    }

    #[test]
    fn lock_changes() {
        let a = lock("sha256-AAAAAAAAAAAAAAAAAAAA=", false);
        let b = lock("sha256-BBBBBBBBBBBBBBBBBBBB=", true);
        assert_eq!(changes(Some(&a), Some(&a)), []);
        let c = changes(Some(&a), Some(&b));
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].input, "common");
        assert_eq!(c[0].change, ChangeKind::Updated);
        assert_eq!(
            c[0].before.as_deref(),
            Some("sha256-AAAAAAAAAAAA (2026-11-26)")
        );
        assert_eq!(c[1].input, "nixpkgs");
        assert_eq!(c[1].change, ChangeKind::Added);
        assert_eq!(c[1].after.as_deref(), Some("rev 0123456 (2023-11-14)"));
        assert_eq!(changes(Some(&b), None)[1].change, ChangeKind::Removed);
        assert_eq!(root_inputs(&a), ["common"]);
    }
}
