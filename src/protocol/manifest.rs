//! The manifest: what one published version of one host contains. Its canonical bytes
//! (compact JSON, fixed field order, entries sorted by path, one trailing newline) are the
//! file `manifests/<digest>.json`, and the sha256 of those bytes is the version's digest.
//! `Manifest::parse_untrusted` is what a host uses: it refuses anything that could make a
//! reader write outside its trees (absolute paths, `..`, duplicates) before a byte is used.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::protocol::listing::{
    BadDigest, BadPath, ConfigEntry, Digest, RelPath, MAX_OBJECT_BYTES,
};
use crate::protocol::HostName;

/// The manifest format publish writes unless `[server] format` says otherwise: the
/// configuration listed file by file in the manifest.
pub const FORMAT: u32 = 1;
/// The format whose configuration is a root tree of shared tree objects and packs
/// (`protocol::tree`, issue #26).
pub const FORMAT_TREES: u32 = 2;
/// Every format this build reads.
pub const FORMATS: [u32; 2] = [FORMAT, FORMAT_TREES];
/// A manifest larger than this is refused unread (a hostile server cannot exhaust memory).
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit")]
    TooLarge(u64),
    #[error("manifest is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("manifest format {0} is not supported (this bento reads formats 1 and 2)")]
    Format(u32),
    #[error("manifest of format {format}: {problem}")]
    Shape { format: u32, problem: &'static str },
    #[error("manifest's configuration: {0}")]
    Tree(#[from] crate::protocol::tree::TreeError),
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

/// How the host turns its configuration into a system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Build {
    /// `nixosConfigurations.<host>.config.system.build.toplevel` of `flake.nix`.
    Flake,
    /// `<nixpkgs/nixos>` with `nixos-config` = `configuration.nix`.
    Classic,
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

/// Format 2's configuration: the root tree (on the wire in place of `config`, whole: a
/// host's root is its own, never shared, so it travels in the manifest rather than as an
/// object of its own) and, once built by publish or expanded from the trees, every tree and
/// pack it is stored as.
#[derive(Debug, Clone)]
pub struct TreeRef {
    /// The root tree's digest, as if it were stored (`sha256` of its object's bytes).
    pub root: Digest,
    pub top: Arc<crate::protocol::tree::Tree>,
    pub stored: Option<Arc<crate::protocol::tree::Trees>>,
}

/// What is stored follows from the root: two references to one root are equal.
impl PartialEq for TreeRef {
    fn eq(&self, other: &Self) -> bool {
        self.root == other.root
    }
}
impl Eq for TreeRef {}

/// One published version of one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub format: u32,
    pub host: HostName,
    /// RFC 3339 UTC time of publication (for people: versions are ordered by `serial`).
    pub created: crate::protocol::Timestamp,
    /// Per-host version number: each publish (and rollback) of a host writes its live
    /// serial + 1, so hosts order versions without trusting clocks. `0` means a manifest
    /// from before serials, and is not written, so such a manifest keeps its bytes.
    pub serial: u64,
    /// The fleet repo's `HEAD` commit when it is a git repository.
    pub source_commit: Option<String>,
    /// The work tree had changes `source_commit` does not hold: this version is not exactly
    /// that commit. Written only when true; older manifests have no such field.
    pub dirty: bool,
    pub build: Build,
    /// The system store path the server built for this version (`bento publish --build`),
    /// so hosts and `bento status` know what "up to date" means. `null` when not built.
    pub system: Option<crate::protocol::StorePath>,
    /// The configuration, file by file. Format 1 carries it; format 2 carries `tree`, and
    /// this is empty until [`Manifest::expand`] reads the trees.
    pub config: Vec<ConfigEntry>,
    /// Format 2 only.
    pub tree: Option<TreeRef>,
    pub files: Vec<FileEntry>,
}

/// The wire form, in field order: format 1 has `config`, format 2 `tree`, never both.
#[derive(Serialize)]
struct WireOut<'a> {
    format: u32,
    host: &'a HostName,
    created: &'a crate::protocol::Timestamp,
    #[serde(skip_serializing_if = "is_zero")]
    serial: u64,
    source_commit: &'a Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    dirty: bool,
    build: Build,
    system: &'a Option<crate::protocol::StorePath>,
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<&'a [ConfigEntry]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tree: Option<&'a crate::protocol::tree::Tree>,
    files: &'a [FileEntry],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireIn {
    format: u32,
    host: HostName,
    created: crate::protocol::Timestamp,
    #[serde(default)]
    serial: u64,
    source_commit: Option<String>,
    #[serde(default)]
    dirty: bool,
    build: Build,
    system: Option<crate::protocol::StorePath>,
    #[serde(default)]
    config: Option<Vec<ConfigEntry>>,
    #[serde(default)]
    tree: Option<crate::protocol::tree::Tree>,
    files: Vec<FileEntry>,
}

impl Serialize for Manifest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let trees = self.format == FORMAT_TREES;
        WireOut {
            format: self.format,
            host: &self.host,
            created: &self.created,
            serial: self.serial,
            source_commit: &self.source_commit,
            dirty: self.dirty,
            build: self.build,
            system: &self.system,
            config: (!trees).then_some(&self.config[..]),
            tree: self.tree.as_ref().filter(|_| trees).map(|t| &*t.top),
            files: &self.files,
        }
        .serialize(s)
    }
}

impl Manifest {
    /// The manifest `w` reads as, its root tree (if any) named `root`.
    fn from_wire(w: WireIn, root: Option<Digest>) -> Self {
        Manifest {
            format: w.format,
            host: w.host,
            created: w.created,
            serial: w.serial,
            source_commit: w.source_commit,
            dirty: w.dirty,
            build: w.build,
            system: w.system,
            config: w.config.unwrap_or_default(),
            tree: w.tree.zip(root).map(|(top, root)| TreeRef {
                root,
                top: Arc::new(top),
                stored: None,
            }),
            files: w.files,
        }
    }
}

impl Manifest {
    /// Sorts entries into canonical order. Call before `to_bytes` on a hand-built manifest.
    pub fn canonicalize(&mut self) {
        self.config.sort_by(|a, b| a.path().cmp(b.path()));
        self.files.sort_by(|a, b| a.path.cmp(&b.path));
    }

    /// Makes this format 2: builds the trees of `config` (kept, expanded), naming each
    /// pack through `pack_of` (the publisher's, which hashes a chunk's files or remembers).
    /// Subtrees are reused from `memo` (other hosts' builds of the same directories).
    pub fn store_as_trees<E>(
        &mut self,
        pack_of: impl FnMut(&[(Digest, u64)]) -> Result<Digest, E>,
        memo: &crate::protocol::tree::Subtrees,
    ) -> Result<(), E> {
        let (trees, top) = crate::protocol::tree::build(&self.config, pack_of, memo)?;
        self.format = FORMAT_TREES;
        self.tree = Some(TreeRef {
            root: trees.root,
            top: Arc::new(top),
            stored: Some(Arc::new(trees)),
        });
        Ok(())
    }

    /// The trees and packs of a format-2 manifest once built or expanded.
    pub fn stored(&self) -> Option<&crate::protocol::tree::Trees> {
        self.tree.as_ref()?.stored.as_deref()
    }

    /// True when `config` lists the configuration (format 1, or format 2 expanded).
    pub fn is_expanded(&self) -> bool {
        self.format != FORMAT_TREES || self.stored().is_some()
    }

    /// Reads a format-2 manifest's trees through `fetch` (each verified against its
    /// digest, bounded as `tree::expand` bounds them) and fills `config`; nothing to do for
    /// format 1 or a manifest already expanded.
    pub fn expand<B: Into<Arc<[u8]>>>(
        &mut self,
        fetch: impl FnMut(&Digest) -> Result<B, crate::protocol::tree::TreeError>,
    ) -> Result<(), ManifestError> {
        if self.is_expanded() {
            return Ok(());
        }
        let tree = self.tree.as_ref().expect("format 2 has a tree");
        let (root, top) = (tree.root, tree.top.clone());
        let mut fetch = fetch;
        // The root is the manifest's own: only the trees below it are fetched.
        let (config, trees) = crate::protocol::tree::expand(&root, |d| match *d == root {
            true => Ok(Arc::<[u8]>::from(top.to_bytes())),
            false => fetch(d).map(Into::into),
        })?;
        self.config = config;
        self.tree = Some(TreeRef {
            root,
            top,
            stored: Some(Arc::new(trees)),
        });
        self.check_structure()
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
        self.system == other.system && self.same_content_but_system(other)
    }

    /// [`Manifest::same_content`], whatever `system` says.
    pub fn same_content_but_system(&self, other: &Manifest) -> bool {
        self.format == other.format
            && self.host == other.host
            && self.build == other.build
            && self.tree == other.tree
            && (self.format == FORMAT_TREES || self.config == other.config)
            && self.files == other.files
    }

    /// Where this version stands in its host's history, oldest first: by `serial`, and for
    /// manifests from before serials (`serial` 0) by `created`.
    pub fn order(&self) -> (u64, std::time::SystemTime) {
        (self.serial, self.created.system_time())
    }

    /// Every object digest the manifest needs, once each: format 1's files; format 2's
    /// trees, packs and the files too large to pack. Format 2 must be expanded first (an
    /// incomplete set here would let GC delete what a version needs).
    pub fn objects(&self) -> BTreeSet<Digest> {
        let stored = match self.format {
            FORMAT_TREES => Some(self.stored().unwrap_or_else(|| {
                panic!(
                    "bug: the objects of manifest {} (format 2) asked before its trees were read",
                    self.host
                )
            })),
            _ => None,
        };
        let packed_max = match stored {
            Some(_) => crate::protocol::pack::PACKED_MAX,
            None => u64::MAX,
        };
        let mut set: BTreeSet<Digest> = self
            .config
            .iter()
            .filter_map(|e| match e {
                ConfigEntry::File { sha256, size, .. } if *size > packed_max => Some(*sha256),
                ConfigEntry::File { sha256, .. } if stored.is_none() => Some(*sha256),
                _ => None,
            })
            .collect();
        if let Some(stored) = stored {
            // The root travels in the manifest.
            set.extend(stored.trees.keys().filter(|d| **d != stored.root));
            set.extend(stored.packs.keys());
        }
        set.extend(self.files.iter().map(|f| f.sha256));
        set
    }

    /// What a host keeps of this version, once each: every file's object (format 2's packed
    /// files too: a host stores files, never packs) and format 2's trees.
    pub fn host_objects(&self) -> BTreeSet<Digest> {
        let mut set: BTreeSet<Digest> = self
            .config
            .iter()
            .filter_map(|e| match e {
                ConfigEntry::File { sha256, .. } => Some(*sha256),
                ConfigEntry::Directory { .. } => None,
            })
            .collect();
        set.extend(self.files.iter().map(|f| f.sha256));
        if let Some(stored) = self.stored() {
            set.extend(stored.trees.keys());
        }
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

    /// Parses and checks structure (format, duplicates, parents), without a digest. A
    /// format-2 manifest comes back with its trees unread ([`Manifest::expand`]).
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
        if !FORMATS.contains(&head.format) {
            return Err(ManifestError::Format(head.format));
        }
        let w: WireIn = serde_json::from_slice(bytes)?;
        let shape = |problem| ManifestError::Shape {
            format: w.format,
            problem,
        };
        match (w.format, &w.config, &w.tree) {
            (FORMAT, None, _) => return Err(shape("no config")),
            (FORMAT, _, Some(_)) => return Err(shape("a tree, which only format 2 has")),
            (FORMAT_TREES, _, None) => return Err(shape("no tree")),
            (FORMAT_TREES, Some(_), _) => return Err(shape("a config, which only format 1 has")),
            _ => {}
        }
        // The root tree is checked as a stored one is (size, names, order, one pack per
        // chunk) and named by the digest its object would have.
        let root = w.tree.as_ref().map(|top| top.named()).transpose()?;
        let m = Manifest::from_wire(w, root);
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
            tree: None,
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
        // The spelling every other sha256 tool prints, both ways, and in JSON.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(Digest::of(b"abc").to_hex(), abc);
        assert_eq!(Digest::of(b"abc").short(), &abc[..12]);
        let json = format!("\"{abc}\"");
        assert_eq!(serde_json::to_string(&Digest::of(b"abc")).unwrap(), json);
        assert_eq!(
            serde_json::from_str::<Digest>(&json).unwrap(),
            Digest::of(b"abc")
        );
        for bad in [
            abc.replacen('b', "g", 1),
            format!("{abc}0"),
            abc.replacen('b', " ", 1),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
            assert!(serde_json::from_str::<Digest>(&format!("\"{bad}\"")).is_err());
        }
        assert!(serde_json::from_str::<Digest>("7").is_err());
    }

    /// The sample as format 2, with the tests' packs named by their files.
    fn sample_trees() -> Manifest {
        let mut m = sample();
        m.store_as_trees(crate::protocol::tree::test_pack_of, &Default::default())
            .unwrap();
        m
    }

    #[test]
    fn the_root_tree_inside_a_manifest_is_checked_as_a_stored_tree_is() {
        let text = String::from_utf8(sample_trees().to_bytes()).unwrap();
        for (from, to, why) in [
            (
                r#""name":"flake.nix""#,
                r#""name":"~/x""#,
                "unsafe entry name",
            ),
            (r#""name":"common""#, r#""name":"zzz""#, "out of order"),
        ] {
            let bad = text.replacen(from, to, 1);
            assert_ne!(bad, text, "{from}");
            let err = Manifest::parse(bad.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(why), "{from} → {to}: {err}");
        }
        // One pack named twice: more packs than the root's chunks.
        let at = text.find(r#""packs":[""#).unwrap() + r#""packs":["#.len();
        let one = &text[at..at + 66];
        let bad = format!("{}{one},{}", &text[..at], &text[at..]);
        let err = Manifest::parse(bad.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("packs' worth of files"), "{err}");
    }

    #[test]
    fn format_2_carries_a_tree_and_expands_to_the_same_configuration() {
        let full = sample_trees();
        let bytes = full.to_bytes();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with(r#"{"format":2,"#), "{text}");
        assert!(
            text.contains(r#""tree":{"format":2,"entries":["#) && !text.contains(r#""config""#),
            "{text}"
        );

        let mut read = Manifest::parse_untrusted(&bytes, &full.digest(), &full.host).unwrap();
        assert!(!read.is_expanded() && read.config.is_empty());
        assert!(
            read.same_content(&full),
            "the root decides, expanded or not"
        );
        assert_eq!(read.to_bytes(), bytes, "one byte form");
        let stored = full.stored().unwrap().clone();
        read.expand(|d| {
            stored.trees.get(d).map(|b| b.to_vec()).ok_or(
                crate::protocol::tree::TreeError::Missing {
                    tree: *d,
                    reason: "absent".into(),
                },
            )
        })
        .unwrap();
        assert_eq!(read.config, sample().config);
        assert_eq!(read.objects(), full.objects());
        let objects = full.objects();
        let root = full.tree.as_ref().unwrap().root;
        assert!(!objects.contains(&root), "the root travels in the manifest");
        assert!(stored
            .trees
            .keys()
            .all(|t| *t == root || objects.contains(t)));
        assert!(stored.packs.keys().all(|p| objects.contains(p)));
        assert_eq!(
            objects.len(),
            stored.trees.len() - 1 + stored.packs.len() + 1,
            "trees below the root, packs and the one `files/` object: a packed file is no object of its own"
        );
        assert!(
            !full.same_content(&sample()),
            "a format change is a new version"
        );
    }

    #[test]
    fn a_manifest_mixing_the_formats_is_refused() {
        let host = HostName::new("alpha").unwrap();
        let one = String::from_utf8(sample().to_bytes()).unwrap();
        let two = String::from_utf8(sample_trees().to_bytes()).unwrap();
        let root = sample_trees().tree.unwrap().root;
        let cases = [
            two.replace(r#""format":2"#, r#""format":1"#),
            one.replace(r#""format":1"#, r#""format":2"#),
            one.replace(r#""files":"#, &format!(r#""tree":"{root}","files":"#)),
            two.replace(r#""format":2"#, r#""format":3"#),
        ];
        for (i, bad) in cases.iter().enumerate() {
            let err = Manifest::parse_untrusted(bad.as_bytes(), &Digest::of(bad.as_bytes()), &host);
            assert!(err.is_err(), "case {i} accepted: {bad}");
        }
    }
}
