//! A Nix store path as the protocol carries it (a manifest's `system`, a report's systems,
//! the agent's state): `/nix/store/<32-char hash>-<name>`, checked on construction so a
//! value of this type is always one. Shared by server and agent; running Nix is the nix module's job.

use std::fmt;
use std::path::Path;

/// A path in the Nix store: `/nix/store/<32-char hash>-<name>`.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct StorePath(String);

#[derive(Debug, thiserror::Error)]
#[error("not a Nix store path: {0:?}")]
pub struct BadStorePath(pub String);

impl StorePath {
    pub fn new(s: &str) -> Result<Self, BadStorePath> {
        let ok = s
            .strip_prefix("/nix/store/")
            .and_then(|rest| rest.split_once('-'))
            .is_some_and(|(hash, name)| {
                hash.len() == 32
                    && hash.bytes().all(|b| b.is_ascii_alphanumeric())
                    && !name.is_empty()
                    && !name.contains('/')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadStorePath(s.chars().take(200).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }

    /// The 32-character hash part, shortened to `n` characters for tables.
    pub fn short_hash(&self, n: usize) -> &str {
        &self.0["/nix/store/".len().."/nix/store/".len() + n.min(32)]
    }

    /// The name part after the hash (`nixos-system-alpha-24.05`).
    pub fn name(&self) -> &str {
        &self.0["/nix/store/".len() + 33..]
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for StorePath {
    type Error = BadStorePath;
    fn try_from(s: String) -> Result<Self, BadStorePath> {
        StorePath::new(&s)
    }
}

impl From<StorePath> for String {
    fn from(p: StorePath) -> String {
        p.0
    }
}
