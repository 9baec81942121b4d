//! The configuration listing both manifest formats and their trees are made of: content
//! digests, safe relative paths and the entries (directories and files) of a host's
//! configuration tree. Invariant: a `RelPath` can be joined onto a directory without leaving
//! it, and a `Digest` is exactly 32 bytes, shown one way (lowercase hex).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// The largest file a manifest may list: publish refuses bigger files, hosts refuse
/// manifests that promise them (a disk-filling object is refused before it is fetched).
pub const MAX_OBJECT_BYTES: u64 = 1024 * 1024 * 1024;

/// A sha256 digest, shown as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest([u8; 32]);

/// Hashes digests for a map keyed by them: a digest's bytes are already uniform, so eight
/// of them are the hash (a map of every object of every host is filled on each publish).
#[derive(Default, Clone, Copy)]
pub struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(17) ^ u64::from_ne_bytes(word);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map keyed by digests, hashed by [`DigestHasher`].
pub type DigestMap<V> =
    std::collections::HashMap<Digest, V, std::hash::BuildHasherDefault<DigestHasher>>;

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        self.hex().as_str().to_owned()
    }

    /// The hex form on the stack: manifests and trees serialise thousands of digests per
    /// publish, and a `String` per digest was a measurable part of it.
    fn hex(&self) -> Hex {
        let mut out = [0u8; 64];
        hex::encode_to_slice(self.0, &mut out).expect("64 digits for 32 bytes");
        Hex(out)
    }

    /// The first 12 hex characters, for tables and logs.
    pub fn short(&self) -> String {
        self.hex().as_str()[..12].to_owned()
    }
}

/// A digest's 64 lowercase hex characters.
struct Hex([u8; 64]);

impl Hex {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hex().as_str())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("not a sha256 digest (64 lowercase hex characters): {0:?}")]
pub struct BadDigest(pub String);

impl FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, BadDigest> {
        let bad = || BadDigest(s.chars().take(80).collect());
        // Lowercase only: one spelling per digest, so equal digests are equal strings.
        if s.len() != 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
        Ok(Self(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.hex().as_str())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor, not `String::deserialize`: the digest is read from the input in place.
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Digest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sha256 digest (64 lowercase hex characters)")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Digest, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// A relative path inside a tree: `/`-separated, no empty, `.` or `..` components, no NUL,
/// no leading or trailing `/`. Safe to join onto a directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(Arc<str>);

#[derive(Debug, thiserror::Error)]
#[error("unsafe or malformed relative path {0:?}")]
pub struct BadPath(pub String);

impl RelPath {
    pub fn new(s: &str) -> Result<Self, BadPath> {
        Self::check(s).map(|()| Self(Arc::from(s)))
    }

    /// `s` as a path, sharing its bytes: a path every host has (a shared module's) is kept
    /// once for all of them.
    pub fn shared(s: Arc<str>) -> Result<Self, BadPath> {
        Self::check(&s).map(|()| Self(s))
    }

    fn check(s: &str) -> Result<(), BadPath> {
        // Bytes, not chars: every path of every host passes here on each publish.
        let bytes = s.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 4096
            && !bytes.contains(&0)
            && bytes
                .split(|&b| b == b'/')
                .all(|c| !c.is_empty() && c != b"." && c != b"..");
        if ok {
            Ok(())
        } else {
            Err(BadPath(s.chars().take(200).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn join(&self, name: &str) -> Result<Self, BadPath> {
        Self::new(&format!("{}/{}", self.0, name))
    }

    /// The parent directory, or `None` at the top of the tree.
    pub fn parent(&self) -> Option<&str> {
        self.0.rsplit_once('/').map(|(p, _)| p)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RelPath::new(&s).map_err(serde::de::Error::custom)
    }
}

/// One entry of the configuration tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigEntry {
    Directory {
        path: RelPath,
    },
    File {
        path: RelPath,
        size: u64,
        sha256: Digest,
        executable: bool,
    },
}

impl ConfigEntry {
    pub fn path(&self) -> &RelPath {
        match self {
            ConfigEntry::Directory { path } | ConfigEntry::File { path, .. } => path,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    File,
    Directory,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfigEntry {
    path: RelPath,
    kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    executable: Option<bool>,
}

impl Serialize for ConfigEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw = match self {
            ConfigEntry::Directory { path } => RawConfigEntry {
                path: path.clone(),
                kind: Kind::Directory,
                size: None,
                sha256: None,
                executable: None,
            },
            ConfigEntry::File {
                path,
                size,
                sha256,
                executable,
            } => RawConfigEntry {
                path: path.clone(),
                kind: Kind::File,
                size: Some(*size),
                sha256: Some(*sha256),
                executable: Some(*executable),
            },
        };
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ConfigEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw = RawConfigEntry::deserialize(d)?;
        match raw.kind {
            Kind::Directory => {
                if raw.size.is_some() || raw.sha256.is_some() || raw.executable.is_some() {
                    return Err(D::Error::custom(format!(
                        "directory entry {:?} has file fields",
                        raw.path.as_str()
                    )));
                }
                Ok(ConfigEntry::Directory { path: raw.path })
            }
            Kind::File => match (raw.size, raw.sha256, raw.executable) {
                (Some(size), Some(sha256), Some(executable)) => Ok(ConfigEntry::File {
                    path: raw.path,
                    size,
                    sha256,
                    executable,
                }),
                _ => Err(D::Error::custom(format!(
                    "file entry {:?} needs size, sha256 and executable",
                    raw.path.as_str()
                ))),
            },
        }
    }
}
