//! The on-disk layout of the chroot root, shared by publish (writer), the server checks and
//! the agent's `file://` transport (readers). See docs/protocol.md.
//!
//! ```text
//! <chroot>/
//!   .bento/                  root 0700: publish lock, caches, the shared object pool
//!   <host>/                  root:<account> 0750
//!     current                hex digest of the live manifest + "\n"
//!     manifests/<digest>.json
//!     manifests/<digest>.sig  SSH signature of the manifest, when the fleet signs
//!     manifests/<digest>.fresh signed freshness stamp of the live version, with `freshness`
//!     objects/<sha256>
//!     cache/                 Nix binary cache of a `build_on = "server"` host (root, 0755)
//!     logs/                  <account>:<account> 0750, writable by the host
//!     backups/               <account>:<account> 0700, with `[server] backups = true`
//! ```

use std::path::{Path, PathBuf};

use crate::protocol::manifest::Digest;
use crate::protocol::HostName;

pub const CURRENT: &str = "current";
pub const MANIFESTS: &str = "manifests";
pub const OBJECTS: &str = "objects";
pub const LOGS: &str = "logs";
/// A `build_on = "server"` host's Nix binary cache (root-owned, read-only; docs/delivery.md).
pub const CACHE: &str = "cache";
/// The binary cache's description file, in `cache/`.
pub const CACHE_INFO: &str = "nix-cache-info";
/// A host's private, writable backup area (with `[server] backups = true`).
pub const BACKUPS: &str = "backups";
/// Server-only state beside the host directories; no host name can collide with it.
pub const STATE: &str = ".bento";

/// A chroot root.
#[derive(Debug, Clone)]
pub struct Chroot {
    pub root: PathBuf,
}

impl Chroot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn host_dir(&self, host: &HostName) -> PathBuf {
        self.root.join(host.as_str())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join(STATE)
    }

    pub fn pool_dir(&self) -> PathBuf {
        self.state_dir().join("pool")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.state_dir().join("tmp")
    }

    pub fn lock_path(&self) -> PathBuf {
        self.state_dir().join("publish.lock")
    }

    pub fn hash_cache_path(&self) -> PathBuf {
        self.state_dir().join("hash-cache")
    }

    pub fn flake_cache_path(&self) -> PathBuf {
        self.state_dir().join("flake-hosts.json")
    }
}

/// Paths inside one host's directory (its chroot).
pub fn current(host_dir: &Path) -> PathBuf {
    host_dir.join(Key::Current.path())
}

pub fn manifest(host_dir: &Path, digest: &Digest) -> PathBuf {
    host_dir.join(Key::Manifest(*digest).path())
}

/// The SSH signature of a manifest (`bento` namespace), when the fleet signs.
pub fn signature(host_dir: &Path, digest: &Digest) -> PathBuf {
    host_dir.join(Key::Signature(*digest).path())
}

pub fn object(host_dir: &Path, digest: &Digest) -> PathBuf {
    host_dir.join(Key::Object(*digest).path())
}

/// The text of a `current` file for `digest`.
pub fn current_text(digest: &Digest) -> String {
    format!("{digest}\n")
}

/// Parses the text of a `current` file.
pub fn parse_current(text: &str) -> Result<Digest, crate::protocol::manifest::BadDigest> {
    text.trim_end_matches('\n').parse()
}

/// What can be listed inside a host's area: the directories of the layout, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    /// `manifests/`: each listed as [`Key::Manifest`], [`Key::Signature`] or [`Key::Fresh`].
    Manifests,
    /// `objects/`: each listed as [`Key::Object`].
    Objects,
    /// `cache/`, recursively: each listed as [`Key::Cache`].
    Cache,
}

impl Area {
    /// The key prefix, with its trailing slash (an object store lists by it).
    pub fn prefix(self) -> &'static str {
        match self {
            Area::Manifests => "manifests/",
            Area::Objects => "objects/",
            Area::Cache => "cache/",
        }
    }
}

/// A relative path under `cache/` or `logs/`: plain components only (no `.`, `..`, empty
/// or absolute part, no NUL), so no key can name anything outside its directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubPath(String);

impl SubPath {
    pub fn new(path: &str) -> Option<Self> {
        let plain = !path.is_empty()
            && !path.contains('\0')
            && path
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        plain.then(|| Self(path.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key inside one host's area: the same bytes are the path relative to the host's chroot
/// directory and the object key under the host's prefix, so the publisher, the agent and
/// every store agree on it. Built from validated parts only.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// `current`.
    Current,
    /// `manifests/<digest>.json`.
    Manifest(Digest),
    /// `manifests/<digest>.sig`.
    Signature(Digest),
    /// `manifests/<digest>.fresh`: the signed freshness stamp of a live version. Keyed by
    /// the digest, so it is written before `current` names the version (as the signature
    /// is) and a stamp can never be read as the word on another version.
    Fresh(Digest),
    /// `objects/<sha256>`.
    Object(Digest),
    /// `cache/<path>`.
    Cache(SubPath),
    /// `logs/<path>`: what the host writes.
    Log(SubPath),
}

impl Key {
    /// The key as text (the path relative to the host's directory).
    pub fn path(&self) -> String {
        match self {
            Key::Current => CURRENT.to_owned(),
            Key::Manifest(d) => format!("{MANIFESTS}/{d}.json"),
            Key::Signature(d) => format!("{MANIFESTS}/{d}.sig"),
            Key::Fresh(d) => format!("{MANIFESTS}/{d}.fresh"),
            Key::Object(d) => format!("{OBJECTS}/{}", d.to_hex()),
            Key::Cache(p) => format!("{CACHE}/{}", p.as_str()),
            Key::Log(p) => format!("{LOGS}/{}", p.as_str()),
        }
    }

    /// The key a text names, if it names one (the inverse of [`Key::path`]).
    pub fn parse(text: &str) -> Option<Self> {
        if text == CURRENT {
            return Some(Key::Current);
        }
        let (dir, rest) = text.split_once('/')?;
        match dir {
            MANIFESTS => {
                if let Some(d) = rest.strip_suffix(".json") {
                    d.parse().ok().map(Key::Manifest)
                } else if let Some(d) = rest.strip_suffix(".fresh") {
                    d.parse().ok().map(Key::Fresh)
                } else {
                    rest.strip_suffix(".sig")?.parse().ok().map(Key::Signature)
                }
            }
            OBJECTS => rest.parse().ok().map(Key::Object),
            CACHE => SubPath::new(rest).map(Key::Cache),
            LOGS => SubPath::new(rest).map(Key::Log),
            _ => None,
        }
    }

    /// Whether the host writes this key (its `logs/`), not the publisher.
    pub fn host_written(&self) -> bool {
        matches!(self, Key::Log(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_chroot_paths_and_parse_back() {
        let d: Digest = "ab".repeat(32).parse().unwrap();
        let cases = [
            (Key::Current, "current".to_owned()),
            (Key::Manifest(d), format!("manifests/{d}.json")),
            (Key::Signature(d), format!("manifests/{d}.sig")),
            (Key::Fresh(d), format!("manifests/{d}.fresh")),
            (Key::Object(d), format!("objects/{d}")),
            (
                Key::Cache(SubPath::new("nar/x.nar.zst").unwrap()),
                "cache/nar/x.nar.zst".to_owned(),
            ),
            (
                Key::Log(SubPath::new("reports/r.json").unwrap()),
                "logs/reports/r.json".to_owned(),
            ),
        ];
        for (key, text) in cases {
            assert_eq!(key.path(), text);
            assert_eq!(Key::parse(&text), Some(key));
        }
        assert_eq!(
            manifest(Path::new("/c/alpha"), &d),
            Path::new("/c/alpha").join(format!("manifests/{d}.json"))
        );
    }

    #[test]
    fn refuses_keys_that_leave_their_directory() {
        for bad in [
            "cache/../current",
            "logs/",
            "logs/a//b",
            "cache/./x",
            "manifests/zz.json",
            "manifests/zz.fresh",
            "objects/../../etc",
            "backups/x",
            "/current",
            "current/",
        ] {
            assert_eq!(Key::parse(bad), None, "{bad}");
        }
    }
}
