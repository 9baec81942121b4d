//! What a new version of a host would change, compared with its live version: configuration
//! files added, removed or changed, `files/` entries by path and hash, settings
//! (`bento-host.json`) by key, and the system a manifest names. Pure over two manifests and
//! their settings' bytes; it never reads or prints a file's contents (a secret's hash is all
//! that is shown).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::protocol::manifest::{ConfigEntry, FileEntry, Manifest};
use crate::protocol::settings::FILE as SETTINGS_FILE;

/// Everything a new version changes for a host (empty: the same content).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Changes {
    /// The host has no live version yet: everything is new.
    pub first_version: bool,
    /// Configuration tree entries (directories end in `/`), `bento-host.json` aside.
    pub config: Vec<PathChange>,
    /// `files/` entries, by their path under `files/`.
    pub files: Vec<FileChange>,
    /// Settings in `bento-host.json` that differ, by key.
    pub settings: Vec<SettingChange>,
    /// The system the manifest names (`publish --build`, `build_on = "server"`), when the
    /// new one names one and it differs.
    pub system: Option<SystemChange>,
}

/// `added`, `removed` or `changed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    Changed,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Changed => "changed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathChange {
    pub path: String,
    pub change: Change,
}

/// A `files/` entry: its hashes (of the ciphertext for a secret) before and after, and
/// which of its other attributes changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileChange {
    pub path: String,
    pub change: Change,
    pub target: String,
    pub sha256_before: Option<String>,
    pub sha256_after: Option<String>,
    /// `target`, `owner`, `group`, `mode`, `encrypted` when they changed (the hash aside).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<String>,
    pub secret: bool,
}

/// One setting: its JSON value before and after (`null`: not set).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SettingChange {
    pub key: String,
    pub before: serde_json::Value,
    pub after: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemChange {
    pub before: Option<String>,
    pub after: Option<String>,
}

impl Changes {
    /// Nothing differs that a host would see.
    pub fn is_empty(&self) -> bool {
        !self.first_version
            && self.config.is_empty()
            && self.files.is_empty()
            && self.settings.is_empty()
            && self.system.is_none()
    }

    /// What changed, in the words `publish --dry-run` prints: `files changed, settings changed`.
    pub fn summary(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.first_version {
            out.push("first version");
            return out;
        }
        if !self.config.is_empty() {
            out.push("configuration changed");
        }
        if !self.files.is_empty() {
            out.push("files changed");
        }
        if !self.settings.is_empty() {
            out.push("settings changed");
        }
        if self.system.is_some() {
            out.push("system changed");
        }
        out
    }
}

/// Compares the live version (with its settings' bytes) and the new one.
pub fn compare(
    live: Option<(&Manifest, Option<&[u8]>)>,
    new: &Manifest,
    new_settings: Option<&[u8]>,
) -> Changes {
    let Some((live, live_settings)) = live else {
        return Changes {
            first_version: true,
            ..Changes::default()
        };
    };
    Changes {
        first_version: false,
        config: config_changes(&live.config, &new.config),
        files: file_changes(&live.files, &new.files),
        settings: setting_changes(live_settings, new_settings),
        // A new manifest without a system (published without `--build`) claims nothing
        // about it: only a different named system is a system change.
        system: (new.system.is_some() && live.system != new.system).then(|| SystemChange {
            before: live.system.as_ref().map(ToString::to_string),
            after: new.system.as_ref().map(ToString::to_string),
        }),
    }
}

fn config_changes(live: &[ConfigEntry], new: &[ConfigEntry]) -> Vec<PathChange> {
    let index = |entries: &[ConfigEntry]| -> BTreeMap<String, ConfigEntry> {
        entries
            .iter()
            .filter(|e| e.path().as_str() != SETTINGS_FILE)
            .map(|e| {
                let name = match e {
                    ConfigEntry::Directory { path } => format!("{path}/"),
                    ConfigEntry::File { path, .. } => path.to_string(),
                };
                (name, e.clone())
            })
            .collect()
    };
    let (before, after) = (index(live), index(new));
    let mut out = Vec::new();
    for (path, entry) in &before {
        match after.get(path) {
            None => out.push(PathChange {
                path: path.clone(),
                change: Change::Removed,
            }),
            Some(e) if e != entry => out.push(PathChange {
                path: path.clone(),
                change: Change::Changed,
            }),
            Some(_) => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        out.push(PathChange {
            path: path.clone(),
            change: Change::Added,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn file_changes(live: &[FileEntry], new: &[FileEntry]) -> Vec<FileChange> {
    let index = |entries: &[FileEntry]| -> BTreeMap<String, FileEntry> {
        entries
            .iter()
            .map(|f| (f.path.to_string(), f.clone()))
            .collect()
    };
    let (before, after) = (index(live), index(new));
    let hex = |f: &FileEntry| Some(f.sha256.to_hex());
    let secret = |f: &FileEntry| f.encrypted.is_some();
    let mut out = Vec::new();
    for (path, b) in &before {
        match after.get(path) {
            None => out.push(FileChange {
                path: path.clone(),
                change: Change::Removed,
                target: b.target.to_string(),
                sha256_before: hex(b),
                sha256_after: None,
                attributes: Vec::new(),
                secret: secret(b),
            }),
            Some(a) if a != b => {
                let mut attributes = Vec::new();
                for (name, differs) in [
                    ("target", a.target != b.target),
                    ("owner", a.owner != b.owner),
                    ("group", a.group != b.group),
                    ("mode", a.mode != b.mode),
                    ("encrypted", a.encrypted != b.encrypted),
                ] {
                    if differs {
                        attributes.push(name.to_owned());
                    }
                }
                out.push(FileChange {
                    path: path.clone(),
                    change: Change::Changed,
                    target: a.target.to_string(),
                    sha256_before: hex(b),
                    sha256_after: hex(a),
                    attributes,
                    secret: secret(a) || secret(b),
                })
            }
            Some(_) => {}
        }
    }
    for (path, a) in after.iter().filter(|(p, _)| !before.contains_key(*p)) {
        out.push(FileChange {
            path: path.clone(),
            change: Change::Added,
            target: a.target.to_string(),
            sha256_before: None,
            sha256_after: hex(a),
            attributes: Vec::new(),
            secret: secret(a),
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Settings by top-level key; bytes that are not a JSON object count as no settings.
fn setting_changes(live: Option<&[u8]>, new: Option<&[u8]>) -> Vec<SettingChange> {
    let parse = |b: Option<&[u8]>| -> BTreeMap<String, serde_json::Value> {
        b.and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default()
    };
    let (before, after) = (parse(live), parse(new));
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let b = before.get(k).cloned().unwrap_or(serde_json::Value::Null);
            let a = after.get(k).cloned().unwrap_or(serde_json::Value::Null);
            (b != a).then(|| SettingChange {
                key: k.clone(),
                before: b,
                after: a,
            })
        })
        .collect()
}

/// The `bento-host.json` entry's object digest in a manifest.
pub fn settings_digest(m: &Manifest) -> Option<crate::protocol::manifest::Digest> {
    m.config.iter().find_map(|e| match e {
        ConfigEntry::File { path, sha256, .. } if path.as_str() == SETTINGS_FILE => Some(*sha256),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::manifest::{Build, Digest, Mode, RelPath, TargetPath, FORMAT};

    fn file(path: &str, content: &[u8]) -> FileEntry {
        FileEntry {
            path: RelPath::new(path).unwrap(),
            target: TargetPath::new(&format!("/etc/{path}")).unwrap(),
            size: content.len() as u64,
            sha256: Digest::of(content),
            owner: "root".into(),
            group: "root".into(),
            mode: Mode(0o600),
            encrypted: None,
        }
    }

    fn manifest(config: &[(&str, &[u8])], files: Vec<FileEntry>) -> Manifest {
        let mut m = Manifest {
            format: FORMAT,
            host: crate::protocol::HostName::new("alpha").unwrap(),
            created: "2026-11-25T12:00:00Z".parse().unwrap(),
            serial: 1,
            source_commit: None,
            dirty: false,
            build: Build::Flake,
            system: None,
            config: config
                .iter()
                .map(|(p, c)| ConfigEntry::File {
                    path: RelPath::new(p).unwrap(),
                    size: c.len() as u64,
                    sha256: Digest::of(c),
                    executable: false,
                })
                .collect(),
            tree: None,
            files,
        };
        m.canonicalize();
        m
    }

    #[test]
    fn each_kind_of_change_is_named_without_contents() {
        let live = manifest(
            &[
                ("flake.nix", b"a"),
                ("old.nix", b"o"),
                (SETTINGS_FILE, b"s1"),
            ],
            vec![file("secret.age", b"ct1"), file("gone", b"g")],
        );
        let new = manifest(
            &[
                ("flake.nix", b"b"),
                ("new.nix", b"n"),
                (SETTINGS_FILE, b"s2"),
            ],
            vec![file("secret.age", b"ct2"), file("motd", b"m")],
        );
        let s1 = br#"{"interval":"15m","checks":[]}"#;
        let s2 = br#"{"interval":"5m","checks":[{"unit":"nginx.service"}]}"#;
        let c = compare(Some((&live, Some(&s1[..]))), &new, Some(&s2[..]));
        let config: Vec<(&str, Change)> = c
            .config
            .iter()
            .map(|p| (p.path.as_str(), p.change))
            .collect();
        assert_eq!(
            config,
            [
                ("flake.nix", Change::Changed),
                ("new.nix", Change::Added),
                ("old.nix", Change::Removed)
            ],
            "bento-host.json is a setting, not a configuration file"
        );
        let files: Vec<(&str, Change)> = c
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.change))
            .collect();
        assert_eq!(
            files,
            [
                ("gone", Change::Removed),
                ("motd", Change::Added),
                ("secret.age", Change::Changed)
            ]
        );
        let secret = &c.files[2];
        assert_eq!(
            secret.sha256_after.as_deref(),
            Some(Digest::of(b"ct2").to_hex().as_str())
        );
        let keys: Vec<&str> = c.settings.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["checks", "interval"]);
        assert_eq!(c.settings[1].before, "15m");
        assert_eq!(c.settings[1].after, "5m");
        assert_eq!(
            c.summary(),
            ["configuration changed", "files changed", "settings changed"]
        );
        assert!(!serde_json::to_string(&c).unwrap().contains("ct2"));
    }

    #[test]
    fn the_same_content_is_no_change_and_a_first_version_is_one() {
        let m = manifest(&[("flake.nix", b"a")], vec![file("x", b"x")]);
        let c = compare(Some((&m, None)), &m, None);
        assert!(c.is_empty(), "{c:?}");
        assert!(c.summary().is_empty());
        // A system named by the new manifest is a change; one left out is not.
        let x = "/nix/store/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-nixos-system-alpha-1";
        let mut built = m.clone();
        built.system = Some(crate::protocol::StorePath::new(x).unwrap());
        let c = compare(Some((&m, None)), &built, None);
        assert_eq!(c.summary(), ["system changed"]);
        assert_eq!(c.system.unwrap().after.as_deref(), Some(x));
        assert!(compare(Some((&built, None)), &m, None).is_empty());
        let first = compare(None, &m, None);
        assert!(!first.is_empty());
        assert_eq!(first.summary(), ["first version"]);
    }
}
