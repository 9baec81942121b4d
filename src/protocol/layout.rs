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
        self.state_dir().join("hash-cache.json")
    }

    pub fn flake_cache_path(&self) -> PathBuf {
        self.state_dir().join("flake-hosts.json")
    }
}

/// Paths inside one host's directory (its chroot).
pub fn current(host_dir: &Path) -> PathBuf {
    host_dir.join(CURRENT)
}

pub fn manifest(host_dir: &Path, digest: &Digest) -> PathBuf {
    host_dir.join(MANIFESTS).join(format!("{digest}.json"))
}

/// The SSH signature of a manifest (`bento` namespace), when the fleet signs.
pub fn signature(host_dir: &Path, digest: &Digest) -> PathBuf {
    host_dir.join(MANIFESTS).join(format!("{digest}.sig"))
}

pub fn object(host_dir: &Path, digest: &Digest) -> PathBuf {
    host_dir.join(OBJECTS).join(digest.to_hex())
}

/// The text of a `current` file for `digest`.
pub fn current_text(digest: &Digest) -> String {
    format!("{digest}\n")
}

/// Parses the text of a `current` file.
pub fn parse_current(text: &str) -> Result<Digest, crate::protocol::manifest::BadDigest> {
    text.trim_end_matches('\n').parse()
}
