//! Nix binary-cache metadata, as `bento publish` exports it into `<host>/cache/` for hosts with
//! `build_on = "server"` (docs/delivery.md): parsing a `.narinfo`, checking its ed25519
//! signature against `cache_keys`, checking a downloaded NAR file against it, and walking a
//! closure to find which narinfos and NARs a host still lacks. Pure: the caller fetches the
//! bytes (over SFTP, from a directory) and says which store paths are present locally.
//!
//! Invariant: a `NarInfo` returned by `parse` has a store path under `/nix/store`, references
//! that are store path base names, and a `URL` that stays inside the cache directory, so a
//! reader can join it onto the cache root without further checks.

use std::collections::{BTreeMap, BTreeSet};

use base64ct::Encoding as _;

/// Where every store path bento deals with lives.
pub const STORE_DIR: &str = "/nix/store";
/// A narinfo larger than this is refused unread (real ones are well under 100 KiB).
pub const MAX_NARINFO_BYTES: usize = 1 << 20;
/// What `nix-cache-info` holds in every cache bento writes.
pub const CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoError {
    #[error("narinfo is {0} bytes, over the limit")]
    TooLarge(usize),
    #[error("narinfo line {line}: {problem}")]
    Line { line: usize, problem: String },
    #[error("narinfo lacks the {0} field")]
    Missing(&'static str),
    #[error("narinfo {field}: {value:?} is not valid")]
    Invalid { field: &'static str, value: String },
    #[error("narinfo for {store_path} has no signature by a trusted cache key ({keys})")]
    Untrusted { store_path: String, keys: String },
    #[error(
        "cache key {0:?}: write it as name:base64 (what `nix key convert-secret-to-public` prints)"
    )]
    BadKey(String),
    #[error("NAR file of {store_path}: {problem}")]
    File { store_path: String, problem: String },
    #[error("asked for the narinfo of {wanted}, got one for {got}")]
    WrongPath { wanted: String, got: String },
}

/// One `<hash>.narinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// `/nix/store/<hash>-<name>`.
    pub store_path: String,
    /// The NAR file, relative to the cache root (`nar/<filehash>.nar.zst`).
    pub url: String,
    /// `zstd`, `xz`, `none`, …
    pub compression: String,
    /// `sha256:<nix32>` of the (compressed) NAR file.
    pub file_hash: Option<String>,
    pub file_size: Option<u64>,
    /// `sha256:<nix32>` of the uncompressed NAR.
    pub nar_hash: String,
    pub nar_size: u64,
    /// Base names (`<hash>-<name>`) of the paths this one refers to, itself possibly included.
    pub references: Vec<String>,
    pub deriver: Option<String>,
    /// `keyname:base64` signatures.
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

/// The 32-character hash part of a store path or base name.
pub fn hash_part(path: &str) -> &str {
    let base = path.strip_prefix("/nix/store/").unwrap_or(path);
    base.get(..32).unwrap_or(base)
}

fn valid_base_name(base: &str) -> bool {
    let Some((hash, name)) = base.split_once('-') else {
        return false;
    };
    hash.len() == 32
        && hash.bytes().all(|b| NIX32.contains(&b))
        && !name.is_empty()
        && name.len() <= 211
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
}

/// A URL a reader may join onto the cache root: relative, no `..`, plain characters.
fn valid_url(url: &str) -> bool {
    !url.is_empty()
        && !url.starts_with('/')
        && url
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && url
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._/".contains(&b))
}

impl NarInfo {
    /// Parses narinfo text (untrusted: a hostile server may have written it).
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        if text.len() > MAX_NARINFO_BYTES {
            return Err(NarInfoError::TooLarge(text.len()));
        }
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        let mut sigs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(": ").or_else(|| {
                // `References: ` with no references may lose its trailing space.
                line.strip_suffix(':').map(|k| (k, ""))
            }) else {
                return Err(NarInfoError::Line {
                    line: i + 1,
                    problem: "not `Key: value`".into(),
                });
            };
            if key == "Sig" {
                sigs.push(value.to_owned());
            } else if fields.insert(key, value).is_some() {
                return Err(NarInfoError::Line {
                    line: i + 1,
                    problem: format!("{key} given twice"),
                });
            }
        }
        let need = |k: &'static str| fields.get(k).copied().ok_or(NarInfoError::Missing(k));
        let invalid = |field: &'static str, value: &str| NarInfoError::Invalid {
            field,
            value: value.chars().take(200).collect(),
        };
        let number = |field: &'static str, v: &str| v.parse::<u64>().map_err(|_| invalid(field, v));
        let store_path = need("StorePath")?;
        if !store_path
            .strip_prefix("/nix/store/")
            .is_some_and(valid_base_name)
        {
            return Err(invalid("StorePath", store_path));
        }
        let url = need("URL")?;
        if !valid_url(url) {
            return Err(invalid("URL", url));
        }
        let nar_hash = need("NarHash")?;
        if !nar_hash.starts_with("sha256:") {
            return Err(invalid("NarHash", nar_hash));
        }
        let references: Vec<String> = need("References")?
            .split(' ')
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(bad) = references.iter().find(|r| !valid_base_name(r)) {
            return Err(invalid("References", bad));
        }
        Ok(Self {
            store_path: store_path.to_owned(),
            url: url.to_owned(),
            compression: fields.get("Compression").unwrap_or(&"bzip2").to_string(),
            file_hash: fields.get("FileHash").map(|s| s.to_string()),
            file_size: fields
                .get("FileSize")
                .map(|v| number("FileSize", v))
                .transpose()?,
            nar_hash: nar_hash.to_owned(),
            nar_size: number("NarSize", need("NarSize")?)?,
            references,
            deriver: fields
                .get("Deriver")
                .filter(|d| **d != "unknown-deriver")
                .map(|s| s.to_string()),
            sigs,
            ca: fields.get("CA").map(|s| s.to_string()),
        })
    }

    /// The 32-character hash part of the store path (`<hash>.narinfo`).
    pub fn hash_part(&self) -> &str {
        hash_part(&self.store_path)
    }

    /// What Nix signs: `1;<storepath>;<narhash>;<narsize>;<refs as full paths, comma-separated>`.
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self
            .references
            .iter()
            .map(|r| format!("{STORE_DIR}/{r}"))
            .collect();
        format!(
            "1;{};{};{};{}",
            self.store_path,
            self.nar_hash,
            self.nar_size,
            refs.join(",")
        )
    }

    /// Succeeds when one signature is by one of `keys` and valid over the fingerprint.
    pub fn verify(&self, keys: &CacheKeys) -> Result<(), NarInfoError> {
        let fingerprint = self.fingerprint();
        let ok = self.sigs.iter().any(|sig| {
            let Some((name, b64)) = sig.split_once(':') else {
                return false;
            };
            let Some(key) = keys.keys.get(name) else {
                return false;
            };
            let Ok(bytes) = base64ct::Base64::decode_vec(b64) else {
                return false;
            };
            let Ok(sig) = ed25519_dalek::Signature::from_slice(&bytes) else {
                return false;
            };
            key.verify_strict(fingerprint.as_bytes(), &sig).is_ok()
        });
        if ok {
            Ok(())
        } else {
            Err(NarInfoError::Untrusted {
                store_path: self.store_path.clone(),
                keys: keys.names().join(", "),
            })
        }
    }

    /// The other store paths this one needs (itself left out), as full paths.
    pub fn dependencies(&self) -> impl Iterator<Item = String> + '_ {
        let own = self.store_path.strip_prefix("/nix/store/").unwrap_or("");
        self.references
            .iter()
            .filter(move |r| r.as_str() != own)
            .map(|r| format!("{STORE_DIR}/{r}"))
    }

    /// Checks a downloaded NAR file's sha256 and size against `FileHash` and `FileSize`.
    pub fn check_file(&self, sha256: &[u8; 32], size: u64) -> Result<(), NarInfoError> {
        let problem = |p: String| NarInfoError::File {
            store_path: self.store_path.clone(),
            problem: p,
        };
        if let Some(expected) = self.file_size {
            if expected != size {
                return Err(problem(format!(
                    "{size} bytes, the narinfo says {expected}"
                )));
            }
        }
        let Some(expected) = &self.file_hash else {
            return Err(problem("the narinfo has no FileHash to check it by".into()));
        };
        let actual = format!("sha256:{}", nix32(sha256));
        if &actual != expected {
            return Err(problem(format!(
                "hash {actual}, the narinfo says {expected}"
            )));
        }
        Ok(())
    }
}

/// The public keys a host trusts for caches: `cache_keys = ["name:base64…"]`.
#[derive(Debug, Clone, Default)]
pub struct CacheKeys {
    keys: BTreeMap<String, ed25519_dalek::VerifyingKey>,
}

impl CacheKeys {
    /// Parses `name:base64` public keys (`nix key convert-secret-to-public` output).
    pub fn parse<S: AsRef<str>>(lines: &[S]) -> Result<Self, NarInfoError> {
        let mut keys = BTreeMap::new();
        for line in lines {
            let line = line.as_ref().trim();
            let bad = || NarInfoError::BadKey(line.chars().take(120).collect());
            let (name, b64) = line.split_once(':').ok_or_else(bad)?;
            let bytes = base64ct::Base64::decode_vec(b64).map_err(|_| bad())?;
            let bytes: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| bad())?;
            if name.is_empty() {
                return Err(bad());
            }
            keys.insert(name.to_owned(), key);
        }
        Ok(Self { keys })
    }

    pub fn names(&self) -> Vec<&str> {
        self.keys.keys().map(String::as_str).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Nix's base-32 (`0123456789abcdfghijklmnpqrsvwxyz`, least significant bits last).
const NIX32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

pub fn nix32(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let len = (bytes.len() * 8 - 1) / 5 + 1;
    (0..len)
        .rev()
        .map(|n| {
            let b = n * 5;
            let (i, j) = (b / 8, b % 8);
            let lo = bytes[i] >> j;
            let hi = if i + 1 < bytes.len() {
                bytes[i + 1].checked_shl(8 - j as u32).unwrap_or(0)
            } else {
                0
            };
            NIX32[((lo | hi) & 0x1f) as usize] as char
        })
        .collect()
}

/// Why a closure walk stopped.
#[derive(Debug, thiserror::Error)]
pub enum WalkError<E: std::error::Error + 'static> {
    #[error("cannot fetch the narinfo of {path}: {source}")]
    Fetch {
        path: String,
        #[source]
        source: E,
    },
    #[error("{path}: {source}")]
    Bad { path: String, source: NarInfoError },
}

/// From `root`, follows `References` through narinfos fetched with `fetch(hash_part)` (and
/// checked against `keys`), skipping paths `present` says are already in the local store
/// (a valid store path's closure is valid too). Returns the narinfos of every missing path,
/// references before the paths that need them: the order to import them in.
pub fn missing<E, F, P>(
    root: &str,
    keys: &CacheKeys,
    present: P,
    mut fetch: F,
) -> Result<Vec<NarInfo>, WalkError<E>>
where
    E: std::error::Error + 'static,
    F: FnMut(&str) -> Result<String, E>,
    P: Fn(&str) -> bool,
{
    let mut infos: BTreeMap<String, NarInfo> = BTreeMap::new();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    // Iterative post-order: (path, children pushed yet).
    let mut stack = vec![(root.to_owned(), false)];
    while let Some((path, expanded)) = stack.pop() {
        if expanded {
            order.push(path);
            continue;
        }
        if !seen.insert(path.clone()) || present(&path) {
            continue;
        }
        let text = fetch(hash_part(&path)).map_err(|source| WalkError::Fetch {
            path: path.clone(),
            source,
        })?;
        let bad = |source| WalkError::Bad {
            path: path.clone(),
            source,
        };
        let info = NarInfo::parse(&text).map_err(bad)?;
        if info.store_path != path {
            return Err(bad(NarInfoError::WrongPath {
                wanted: path.clone(),
                got: info.store_path,
            }));
        }
        info.verify(keys).map_err(bad)?;
        stack.push((path.clone(), true));
        for dep in info.dependencies() {
            if !seen.contains(&dep) {
                stack.push((dep, false));
            }
        }
        infos.insert(path, info);
    }
    Ok(order.into_iter().filter_map(|p| infos.remove(&p)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer as _;

    const A: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a";
    const B: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b";
    const C: &str = "/nix/store/cccccccccccccccccccccccccccccccc-c";

    fn key() -> (ed25519_dalek::SigningKey, CacheKeys) {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let public = format!(
            "test-1:{}",
            base64ct::Base64::encode_string(sk.verifying_key().as_bytes())
        );
        (sk, CacheKeys::parse(&[public]).unwrap())
    }

    fn info(path: &str, refs: &[&str], sk: &ed25519_dalek::SigningKey) -> String {
        let refs: Vec<&str> = refs.iter().map(|r| &r["/nix/store/".len()..]).collect();
        let mut n = NarInfo {
            store_path: path.into(),
            url: format!("nar/{}.nar.zst", hash_part(path)),
            compression: "zstd".into(),
            file_hash: None,
            file_size: None,
            nar_hash: "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into(),
            nar_size: 120,
            references: refs.iter().map(|r| r.to_string()).collect(),
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        let sig = sk.sign(n.fingerprint().as_bytes());
        n.sigs.push(format!(
            "test-1:{}",
            base64ct::Base64::encode_string(&sig.to_bytes())
        ));
        format!(
            "StorePath: {}\nURL: {}\nCompression: zstd\nNarHash: {}\nNarSize: {}\nReferences: {}\nSig: {}\n",
            n.store_path,
            n.url,
            n.nar_hash,
            n.nar_size,
            refs.join(" "),
            n.sigs[0]
        )
    }

    #[test]
    fn parses_verifies_and_refuses_tampering() {
        let (sk, keys) = key();
        let text = info(A, &[A, B], &sk);
        let n = NarInfo::parse(&text).unwrap();
        assert_eq!(n.hash_part(), "a".repeat(32));
        assert_eq!(n.dependencies().collect::<Vec<_>>(), vec![B.to_owned()]);
        assert_eq!(n.fingerprint(), format!("1;{A};{};120;{A},{B}", n.nar_hash));
        n.verify(&keys).unwrap();
        let tampered = NarInfo::parse(&text.replace("NarSize: 120", "NarSize: 121")).unwrap();
        assert!(matches!(
            tampered.verify(&keys),
            Err(NarInfoError::Untrusted { .. })
        ));
        let other = CacheKeys::parse(&[format!(
            "test-1:{}",
            base64ct::Base64::encode_string(
                ed25519_dalek::SigningKey::from_bytes(&[8u8; 32])
                    .verifying_key()
                    .as_bytes()
            )
        )])
        .unwrap();
        assert!(n.verify(&other).is_err());
        assert!(n.verify(&CacheKeys::default()).is_err());
    }

    #[test]
    fn hostile_narinfos_are_refused() {
        let (sk, _) = key();
        let good = info(A, &[B], &sk);
        for bad in [
            good.replace("URL: nar/", "URL: ../"),
            good.replace("URL: nar/", "URL: /etc/"),
            good.replace("URL: nar/", "URL: nar/../../"),
            good.replace("StorePath: /nix/store/", "StorePath: /tmp/"),
            good.replace("References: bbbb", "References: ../bb"),
            good.replace("NarSize: 120", "NarSize: -1"),
            good.replace("NarHash: sha256:", "NarHash: md5:"),
            good.replace("URL:", "URL: x\nURL:"),
            good.replace("StorePath: ", "StorePath "),
            good.replace("NarHash", "Narhash"),
            "x".repeat(MAX_NARINFO_BYTES + 1),
        ] {
            assert!(NarInfo::parse(&bad).is_err(), "{bad}");
        }
        assert!(CacheKeys::parse(&["nocolon"]).is_err());
        assert!(CacheKeys::parse(&["k:AAAA"]).is_err());
    }

    #[test]
    fn nix32_matches_nix() {
        // `nix hash to-base32 sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=` (sha256 of "").
        use sha2::Digest as _;
        let empty: [u8; 32] = sha2::Sha256::digest(b"").into();
        assert_eq!(
            nix32(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    #[test]
    fn walks_the_closure_skipping_present_paths() {
        let (sk, keys) = key();
        let store: BTreeMap<String, String> = [
            (hash_part(A).to_owned(), info(A, &[A, B, C], &sk)),
            (hash_part(B).to_owned(), info(B, &[C], &sk)),
            (hash_part(C).to_owned(), info(C, &[], &sk)),
        ]
        .into();
        let fetch = |h: &str| {
            store
                .get(h)
                .cloned()
                .ok_or_else(|| std::io::Error::other("no such narinfo"))
        };
        let all = missing(A, &keys, |_| false, fetch).unwrap();
        let paths: Vec<&str> = all.iter().map(|n| n.store_path.as_str()).collect();
        assert_eq!(paths, [C, B, A]);
        let some = missing(A, &keys, |p| p == B, fetch).unwrap();
        let paths: Vec<&str> = some.iter().map(|n| n.store_path.as_str()).collect();
        assert_eq!(paths, [C, A]);
        assert!(missing(A, &keys, |p| p == A, fetch).unwrap().is_empty());
        // A missing narinfo, and one signed by nobody trusted, stop the walk.
        let partial = |h: &str| {
            if h == hash_part(C) {
                Err(std::io::Error::other("no such narinfo"))
            } else {
                fetch(h)
            }
        };
        let err = missing(A, &keys, |_| false, partial).unwrap_err();
        assert!(err.to_string().contains(C), "{err}");
        assert!(missing(A, &CacheKeys::default(), |_| false, fetch).is_err());
        // A narinfo served under another path's name is refused.
        let swapped = |h: &str| fetch(if h == hash_part(B) { hash_part(C) } else { h });
        let err = missing(A, &keys, |_| false, swapped).unwrap_err();
        assert!(err.to_string().contains("asked for"), "{err}");
    }
}
