//! The manifest: what one published version of one host contains. Its canonical bytes
//! (compact JSON, fixed field order, entries sorted by path, one trailing newline) are the
//! file `manifests/<digest>.json`, and the sha256 of those bytes is the version's digest.
//! `Manifest::parse_untrusted` is what a host uses: it refuses anything that could make a
//! reader write outside its trees (absolute paths, `..`, duplicates) before a byte is used.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use crate::protocol::HostName;

/// The manifest format this build writes and reads.
pub const FORMAT: u32 = 1;
/// A manifest larger than this is refused unread (a hostile server cannot exhaust memory).
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;
/// The largest file a manifest may list: publish refuses bigger files, hosts refuse
/// manifests that promise them (a disk-filling object is refused before it is fetched).
pub const MAX_OBJECT_BYTES: u64 = 1024 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit")]
    TooLarge(u64),
    #[error("manifest is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("manifest format {0} is not supported (this bento reads format {FORMAT})")]
    Format(u32),
    #[error("manifest digest mismatch: expected {expected}, content hashes to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("manifest lists {0:?} twice")]
    Duplicate(String),
    #[error(
        "manifest entry {path:?}: its parent directory {parent:?} is not listed as a directory"
    )]
    Orphan { path: String, parent: String },
    #[error(
        "manifest entry {path:?} is {size} bytes, more than the {MAX_OBJECT_BYTES}-byte limit"
    )]
    ObjectTooLarge { path: String, size: u64 },
    #[error("manifest is for host {found}, not {expected}")]
    WrongHost { expected: HostName, found: HostName },
}

/// A sha256 digest, shown as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex characters, for tables and logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
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
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A relative path inside a tree: `/`-separated, no empty, `.` or `..` components, no NUL,
/// no leading or trailing `/`. Safe to join onto a directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct RelPath(String);

#[derive(Debug, thiserror::Error)]
#[error("unsafe or malformed relative path {0:?}")]
pub struct BadPath(pub String);

impl RelPath {
    pub fn new(s: &str) -> Result<Self, BadPath> {
        let ok = !s.is_empty()
            && s.len() <= 4096
            && !s.contains('\0')
            && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
        if ok {
            Ok(Self(s.to_owned()))
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

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RelPath::new(&s).map_err(serde::de::Error::custom)
    }
}

/// How the host turns its configuration into a system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Build {
    /// `nixosConfigurations.<host>.config.system.build.toplevel` of `flake.nix`.
    Flake,
    /// `<nixpkgs/nixos>` with `nixos-config` = `configuration.nix`.
    Classic,
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

/// A file installed verbatim on the host, outside the Nix store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Where it came from, relative to `files/` (for messages; the host uses `target`).
    pub path: RelPath,
    /// Absolute path on the host.
    pub target: TargetPath,
    pub size: u64,
    pub sha256: Digest,
    pub owner: String,
    pub group: String,
    /// Permission bits, as four octal digits (`"0600"`).
    pub mode: Mode,
    /// Set when the object is encrypted (`"age"`): `size` and `sha256` are the ciphertext's
    /// and the host decrypts it before installing. Absent (never `null`) otherwise, so an
    /// unencrypted manifest's bytes are what they were before encryption existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<crate::protocol::secret::Encryption>,
}

/// An absolute, normalised path on the host (`/etc/x`), without `.`/`..` or empty parts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct TargetPath(String);

impl TargetPath {
    pub fn new(s: &str) -> Result<Self, BadPath> {
        match s.strip_prefix('/') {
            Some(rest) if RelPath::new(rest).is_ok() => Ok(Self(s.to_owned())),
            _ => Err(BadPath(s.chars().take(200).collect())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TargetPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TargetPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TargetPath::new(&s).map_err(serde::de::Error::custom)
    }
}

/// Unix permission bits (at most `0o7777`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid mode {s:?}: use octal digits such as \"0600\"");
        if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(bad());
        }
        u32::from_str_radix(s, 8).map(Mode).map_err(|_| bad())
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One published version of one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub host: HostName,
    /// RFC 3339 UTC time of publication (for people: versions are ordered by `serial`).
    pub created: crate::protocol::Timestamp,
    /// Per-host version number: each publish (and rollback) of a host writes its live
    /// serial + 1, so hosts order versions without trusting clocks. `0` means a manifest
    /// from before serials, and is not written, so such a manifest keeps its bytes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub serial: u64,
    /// The fleet repo's `HEAD` commit when it is a git repository.
    pub source_commit: Option<String>,
    /// The work tree had changes `source_commit` does not hold: this version is not exactly
    /// that commit. Written only when true; older manifests have no such field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dirty: bool,
    pub build: Build,
    /// The system store path the server built for this version (`bento publish --build`),
    /// so hosts and `bento status` know what "up to date" means. `null` when not built.
    pub system: Option<crate::protocol::StorePath>,
    pub config: Vec<ConfigEntry>,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Sorts entries into canonical order. Call before `to_bytes` on a hand-built manifest.
    pub fn canonicalize(&mut self) {
        self.config.sort_by(|a, b| a.path().cmp(b.path()));
        self.files.sort_by(|a, b| a.path.cmp(&b.path));
    }

    /// The canonical bytes: what is written to `manifests/<digest>.json`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).expect("manifest serialises");
        out.push(b'\n');
        out
    }

    pub fn digest(&self) -> Digest {
        Digest::of(&self.to_bytes())
    }

    /// True when both describe the same content, whenever and from whichever commit (clean
    /// or dirty) they were published: the test for "unchanged".
    pub fn same_content(&self, other: &Manifest) -> bool {
        self.format == other.format
            && self.host == other.host
            && self.build == other.build
            && self.system == other.system
            && self.config == other.config
            && self.files == other.files
    }

    /// Where this version stands in its host's history, oldest first: by `serial`, and for
    /// manifests from before serials (`serial` 0) by `created`.
    pub fn order(&self) -> (u64, std::time::SystemTime) {
        (self.serial, self.created.system_time())
    }

    /// Every object digest the manifest needs, once each.
    pub fn objects(&self) -> BTreeSet<Digest> {
        let mut set: BTreeSet<Digest> = self
            .config
            .iter()
            .filter_map(|e| match e {
                ConfigEntry::File { sha256, .. } => Some(*sha256),
                ConfigEntry::Directory { .. } => None,
            })
            .collect();
        set.extend(self.files.iter().map(|f| f.sha256));
        set
    }

    /// Parses bytes from an untrusted source: checks size, digest, format, host, paths,
    /// duplicates and that every entry's parent directory is listed.
    pub fn parse_untrusted(
        bytes: &[u8],
        expected_digest: &Digest,
        expected_host: &HostName,
    ) -> Result<Manifest, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len() as u64));
        }
        let actual = Digest::of(bytes);
        if actual != *expected_digest {
            return Err(ManifestError::DigestMismatch {
                expected: *expected_digest,
                actual,
            });
        }
        let m = Self::parse(bytes)?;
        if m.host != *expected_host {
            return Err(ManifestError::WrongHost {
                expected: expected_host.clone(),
                found: m.host,
            });
        }
        Ok(m)
    }

    /// Parses and checks structure (format, duplicates, parents), without a digest.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len() as u64));
        }
        // Read the format first so a future format gets a clear message, not a field error.
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_slice(bytes)?;
        if head.format != FORMAT {
            return Err(ManifestError::Format(head.format));
        }
        let m: Manifest = serde_json::from_slice(bytes)?;
        m.check_structure()?;
        Ok(m)
    }

    fn check_structure(&self) -> Result<(), ManifestError> {
        let sizes = self
            .config
            .iter()
            .filter_map(|e| match e {
                ConfigEntry::File { path, size, .. } => Some((path.as_str(), *size)),
                ConfigEntry::Directory { .. } => None,
            })
            .chain(self.files.iter().map(|f| (f.path.as_str(), f.size)));
        for (path, size) in sizes {
            if size > MAX_OBJECT_BYTES {
                return Err(ManifestError::ObjectTooLarge {
                    path: path.to_owned(),
                    size,
                });
            }
        }
        let mut dirs = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for e in &self.config {
            let p = e.path().as_str();
            if !seen.insert(p) {
                return Err(ManifestError::Duplicate(p.to_owned()));
            }
            if let ConfigEntry::Directory { .. } = e {
                dirs.insert(p);
            }
        }
        for e in &self.config {
            if let Some(parent) = e.path().parent() {
                if !dirs.contains(parent) {
                    return Err(ManifestError::Orphan {
                        path: e.path().to_string(),
                        parent: parent.to_owned(),
                    });
                }
            }
        }
        let mut targets = BTreeSet::new();
        for f in &self.files {
            if !targets.insert(f.target.as_str()) {
                return Err(ManifestError::Duplicate(f.target.to_string()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let d = Digest::of(b"hello");
        let mut m = Manifest {
            format: FORMAT,
            host: HostName::new("alpha").unwrap(),
            created: "2026-11-25T12:00:00Z".parse().unwrap(),
            serial: 0,
            source_commit: None,
            dirty: false,
            build: Build::Flake,
            system: None,
            config: vec![
                ConfigEntry::File {
                    path: RelPath::new("common/base.nix").unwrap(),
                    size: 5,
                    sha256: d,
                    executable: false,
                },
                ConfigEntry::Directory {
                    path: RelPath::new("common").unwrap(),
                },
                ConfigEntry::File {
                    path: RelPath::new("flake.nix").unwrap(),
                    size: 5,
                    sha256: d,
                    executable: false,
                },
            ],
            files: vec![FileEntry {
                path: RelPath::new("etc/secret").unwrap(),
                target: TargetPath::new("/etc/secret").unwrap(),
                size: 5,
                sha256: d,
                owner: "root".into(),
                group: "root".into(),
                mode: Mode(0o600),
                encrypted: None,
            }],
        };
        m.canonicalize();
        m
    }

    #[test]
    fn round_trip_is_byte_identical() {
        let m = sample();
        let bytes = m.to_bytes();
        let back = Manifest::parse_untrusted(&bytes, &m.digest(), &m.host).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(m.objects().len(), 1);
    }

    #[test]
    fn canonical_order_and_fields() {
        let text = String::from_utf8(sample().to_bytes()).unwrap();
        assert!(
            text.starts_with(r#"{"format":1,"host":"alpha","created":"#),
            "{text}"
        );
        let common = text.find(r#""path":"common""#).unwrap();
        let base = text.find(r#""path":"common/base.nix""#).unwrap();
        assert!(common < base);
        assert!(text.contains(r#""mode":"0600""#));
        assert!(text.ends_with("}\n"));
    }

    #[test]
    fn same_content_ignores_time_and_commit() {
        let a = sample();
        let mut b = sample();
        b.created = "2030-01-01T00:00:00Z".parse().unwrap();
        b.source_commit = Some("abc".into());
        b.serial = 7;
        assert!(a.same_content(&b), "a new serial alone is no new content");
        b.dirty = true;
        assert!(a.same_content(&b), "a dirty flag alone is no new content");
        assert_ne!(a.digest(), b.digest());
        b.files[0].mode = Mode(0o640);
        assert!(!a.same_content(&b));
    }

    #[test]
    fn serial_is_written_after_created_and_only_when_set() {
        let old = sample();
        let text = String::from_utf8(old.to_bytes()).unwrap();
        assert!(
            !text.contains("serial"),
            "a manifest from before serials keeps its bytes"
        );
        let mut m = sample();
        m.serial = 42;
        let text = String::from_utf8(m.to_bytes()).unwrap();
        assert!(
            text.contains(r#""created":"2026-11-25T12:00:00Z","serial":42,"source_commit""#),
            "{text}"
        );
        let back = Manifest::parse_untrusted(&m.to_bytes(), &m.digest(), &m.host).unwrap();
        assert_eq!(back.serial, 42);
        assert!(m.order() > old.order());
    }

    #[test]
    fn hostile_manifests_are_refused() {
        let host = HostName::new("alpha").unwrap();
        let good = String::from_utf8(sample().to_bytes()).unwrap();
        let cases = [
            good.replace("common/base.nix", "../etc/passwd"),
            good.replace("common/base.nix", "/etc/passwd"),
            good.replace("common/base.nix", "common/./x"),
            good.replace("\"/etc/secret\"", "\"/etc/../root/x\""),
            good.replace("\"/etc/secret\"", "\"etc/secret\""),
            good.replace("flake.nix", "common/base.nix"),
            good.replace(
                "\"path\":\"common\",\"kind\":\"directory\"",
                "\"path\":\"zz\",\"kind\":\"directory\"",
            ),
            good.replace("\"format\":1", "\"format\":2"),
            good.replace("\"0600\"", "\"0999\""),
            good.replace("\"build\":\"flake\"", "\"build\":\"flake\",\"extra\":1"),
        ];
        for (i, bad) in cases.iter().enumerate() {
            assert_ne!(bad, &good, "case {i} did not change the manifest");
            let digest = Digest::of(bad.as_bytes());
            assert!(
                Manifest::parse_untrusted(bad.as_bytes(), &digest, &host).is_err(),
                "case {i} accepted: {bad}"
            );
        }
        // A correct manifest under the wrong name or for another host.
        let m = sample();
        assert!(matches!(
            Manifest::parse_untrusted(&m.to_bytes(), &Digest::of(b"x"), &host),
            Err(ManifestError::DigestMismatch { .. })
        ));
        let beta = HostName::new("beta").unwrap();
        assert!(matches!(
            Manifest::parse_untrusted(&m.to_bytes(), &m.digest(), &beta),
            Err(ManifestError::WrongHost { .. })
        ));
    }

    #[test]
    fn digests_parse_strictly() {
        let d = Digest::of(b"x");
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert!(d.to_hex().to_uppercase().parse::<Digest>().is_err());
        assert!("abc".parse::<Digest>().is_err());
    }
}
