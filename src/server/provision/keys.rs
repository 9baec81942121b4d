//! Host public keys from `bento.toml`: a key is accepted only as one OpenSSH public key line
//! whose decoded blob matches its declared type (ed25519, ecdsa, rsa ≥ 2048 bits), and no
//! key may serve two hosts.

use std::collections::BTreeMap;
use std::fmt;

use crate::server::fleet::{FleetConfig, HostName};

/// Smallest RSA modulus accepted; 1024-bit keys are within reach of well-funded attackers.
pub const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("host {host}: key is empty")]
    Empty { host: HostName },
    #[error("host {host}: key must be a single line (one OpenSSH public key)")]
    MultiLine { host: HostName },
    #[error("host {host}: key contains control characters")]
    Control { host: HostName },
    #[error("host {host}: key type {kind:?} is not accepted (use ssh-ed25519, ecdsa-sha2-nistp256/384/521 or ssh-rsa of at least {MIN_RSA_BITS} bits)")]
    Type { host: HostName, kind: String },
    #[error("host {host}: key has no base64 key data after {kind:?}")]
    Missing { host: HostName, kind: String },
    #[error("host {host}: key data is not valid base64")]
    Base64 { host: HostName },
    #[error("host {host}: key data is malformed: {problem}")]
    Blob { host: HostName, problem: String },
    #[error("host {host}: key says {declared:?} but its data is a {actual:?} key")]
    Mismatch {
        host: HostName,
        declared: String,
        actual: String,
    },
    #[error("host {host}: RSA key has {bits} bits; at least {MIN_RSA_BITS} are required")]
    RsaTooSmall { host: HostName, bits: usize },
    #[error("hosts {first} and {second} have the same key; each host needs its own (one host could otherwise read the other's secrets)")]
    Duplicate { first: HostName, second: HostName },
}

impl KeyError {
    /// Whether this problem is about `host`.
    pub fn concerns(&self, host: &HostName) -> bool {
        match self {
            KeyError::Duplicate { first, second } => first == host || second == host,
            KeyError::Empty { host: h }
            | KeyError::MultiLine { host: h }
            | KeyError::Control { host: h }
            | KeyError::Type { host: h, .. }
            | KeyError::Missing { host: h, .. }
            | KeyError::Base64 { host: h }
            | KeyError::Blob { host: h, .. }
            | KeyError::Mismatch { host: h, .. }
            | KeyError::RsaTooSmall { host: h, .. } => h == host,
        }
    }
}

/// The keys (`type base64`, options and comments dropped) of an authorized-keys file.
pub fn keys_in_authorized_file(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words
                .iter()
                .position(|w| ACCEPTED.contains(w) || w.starts_with("sk-") || *w == "ssh-dss")
                .and_then(|i| words.get(i..i + 2))
                .map(|kv| kv.join(" "))
                .unwrap_or_else(|| l.trim().to_owned())
        })
        .collect()
}

/// Several key problems at once, so an operator fixes them all in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyErrors(pub Vec<KeyError>);

impl fmt::Display for KeyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for KeyErrors {}

/// A validated public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    kind: String,
    blob: Vec<u8>,
    base64: String,
    comment: Option<String>,
}

impl PublicKey {
    /// Parses one OpenSSH public key line (`type base64 [comment]`) given for `host`.
    pub fn parse(host: &HostName, line: &str) -> Result<Self, KeyError> {
        let h = || host.clone();
        let line = line.trim();
        if line.is_empty() {
            return Err(KeyError::Empty { host: h() });
        }
        if line.contains(['\n', '\r']) {
            return Err(KeyError::MultiLine { host: h() });
        }
        if line.chars().any(|c| c.is_control() && c != '\t') {
            return Err(KeyError::Control { host: h() });
        }
        let mut fields = line.split_ascii_whitespace();
        let kind = fields.next().unwrap_or_default().to_owned();
        if !ACCEPTED.contains(&kind.as_str()) {
            return Err(KeyError::Type { host: h(), kind });
        }
        let Some(base64) = fields.next() else {
            return Err(KeyError::Missing { host: h(), kind });
        };
        let blob = decode_base64(base64).ok_or(KeyError::Base64 { host: h() })?;
        let comment = fields.collect::<Vec<_>>().join(" ");
        check_blob(host, &kind, &blob)?;
        Ok(Self {
            kind,
            blob,
            base64: base64.to_owned(),
            comment: (!comment.is_empty()).then_some(comment),
        })
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The key without its comment: what identifies it.
    pub fn key_only(&self) -> String {
        format!("{} {}", self.kind, self.base64)
    }

    /// The line for an authorized-keys file. `restrict` turns off every forwarding, the pty
    /// and ~/.ssh/rc for this key, whatever sshd_config says.
    pub fn authorized_line(&self) -> String {
        match &self.comment {
            Some(c) => format!("restrict {} {c}", self.key_only()),
            None => format!("restrict {}", self.key_only()),
        }
    }

    /// Whether two keys are the same key (comments aside).
    pub fn same_key(&self, other: &PublicKey) -> bool {
        self.kind == other.kind && self.blob == other.blob
    }
}

const ACCEPTED: [&str; 5] = [
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
];

/// Checks the wire-format blob (RFC 4253 §6.6, RFC 5656 §3.1, RFC 8709 §4) with ssh-key's
/// decoder; the policy on top (declared type matches, RSA size and exponent, uncompressed
/// ECDSA points as OpenSSH writes them, nothing trailing) is bento's.
fn check_blob(host: &HostName, declared: &str, blob: &[u8]) -> Result<(), KeyError> {
    use ssh_key::public::KeyData;
    let bad = |problem: &str| KeyError::Blob {
        host: host.clone(),
        problem: problem.to_owned(),
    };
    // The type named inside (an SSH string: u32 length, bytes), read on its own first, so a
    // mismatch names what it is even when ssh-key does not know that type.
    let actual = blob
        .get(..4)
        .map(|len| u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize)
        .and_then(|len| blob.get(4..4 + len))
        .ok_or_else(|| bad("no key type inside"))?;
    let actual = String::from_utf8_lossy(actual).into_owned();
    if actual != declared {
        return Err(KeyError::Mismatch {
            host: host.clone(),
            declared: declared.to_owned(),
            actual,
        });
    }
    let key = ssh_key::PublicKey::from_bytes(blob).map_err(|e| {
        bad(&match declared {
            "ssh-ed25519" => format!("not a 32-byte ed25519 key ({e})"),
            "ssh-rsa" => format!("not an RSA key ({e})"),
            _ => format!("the curve name does not match the key type, or the curve point is not a point of that curve ({e})"),
        })
    })?;
    match key.key_data() {
        KeyData::Ed25519(_) => {}
        KeyData::Rsa(rsa) => {
            let e = rsa
                .e
                .as_positive_bytes()
                .ok_or_else(|| bad("negative exponent"))?;
            let e = strip_zeros(e);
            if e.is_empty() || e[e.len() - 1] & 1 == 0 || (e.len() == 1 && e[0] < 3) {
                return Err(bad("the RSA exponent must be odd and at least 3"));
            }
            let n = rsa
                .n
                .as_positive_bytes()
                .ok_or_else(|| bad("negative modulus"))?;
            let n = strip_zeros(n);
            let bits = match n.first() {
                Some(&top) => n.len() * 8 - top.leading_zeros() as usize,
                None => 0,
            };
            if bits < MIN_RSA_BITS {
                return Err(KeyError::RsaTooSmall {
                    host: host.clone(),
                    bits,
                });
            }
        }
        KeyData::Ecdsa(point) => {
            // OpenSSH writes (and its own parser insists on) uncompressed points.
            if point.as_sec1_bytes().first() != Some(&4) {
                return Err(bad(
                    "the curve point is not an uncompressed point of that curve",
                ));
            }
        }
        _ => return Err(bad("not an ed25519, ecdsa or rsa key")),
    }
    Ok(())
}

fn strip_zeros(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != 0).unwrap_or(v.len());
    &v[start..]
}

/// Standard base64 with canonical padding, as OpenSSH writes it; anything else is refused.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64ct::Encoding as _;
    base64ct::Base64::decode_vec(text)
        .ok()
        .filter(|v| !v.is_empty())
}

/// Every host's key, validated; hosts without a key map to `None`. All problems are
/// returned together.
pub fn fleet_keys(
    config: &FleetConfig,
) -> Result<BTreeMap<HostName, Option<PublicKey>>, KeyErrors> {
    let mut errors = Vec::new();
    let mut keys: BTreeMap<HostName, Option<PublicKey>> = BTreeMap::new();
    for (host, hc) in &config.hosts {
        let key = match hc.key.as_deref().map(|k| PublicKey::parse(host, k)) {
            None => None,
            Some(Ok(k)) => Some(k),
            Some(Err(e)) => {
                errors.push(e);
                None
            }
        };
        if let Some(k) = &key {
            let twin = keys
                .iter()
                .find(|(_, other)| other.as_ref().is_some_and(|o| o.same_key(k)));
            if let Some((first, _)) = twin {
                errors.push(KeyError::Duplicate {
                    first: first.clone(),
                    second: host.clone(),
                });
            }
        }
        keys.insert(host.clone(), key);
    }
    if errors.is_empty() {
        Ok(keys)
    } else {
        Err(KeyErrors(errors))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn b64(data: &[u8]) -> String {
        use base64ct::Encoding as _;
        base64ct::Base64::encode_string(data)
    }

    pub const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHFSC/XxzabMcgDewCNaqV3Ig9tNzGTvvUJSjFIfzLTB alpha@test";
    pub const ED25519_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGoHxVad6fztZ/OgbFbMCCbcA/3PqLZz0qlcFoR4ieNm";

    fn host() -> HostName {
        HostName::new("web").unwrap()
    }

    fn string(out: &mut Vec<u8>, v: &[u8]) {
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }

    fn rsa(bits: usize) -> String {
        let mut blob = Vec::new();
        string(&mut blob, b"ssh-rsa");
        string(&mut blob, &[1, 0, 1]);
        let mut n = vec![0u8];
        n.push(0x80);
        n.extend(std::iter::repeat_n(0x5a, bits / 8 - 1));
        string(&mut blob, &n);
        format!("ssh-rsa {}", b64(&blob))
    }

    fn ecdsa(curve: &str, inner: &str, coord: usize) -> String {
        let mut blob = Vec::new();
        string(&mut blob, format!("ecdsa-sha2-{curve}").as_bytes());
        string(&mut blob, inner.as_bytes());
        let mut point = vec![4u8];
        point.extend(std::iter::repeat_n(7, 2 * coord));
        string(&mut blob, &point);
        format!("ecdsa-sha2-{curve} {}", b64(&blob))
    }

    #[test]
    fn base64_round_trip() {
        for len in 0..10 {
            let data: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37)).collect();
            if len > 0 {
                assert_eq!(decode_base64(&b64(&data)).unwrap(), data);
            }
        }
        assert_eq!(decode_base64("QQ=="), Some(b"A".to_vec()));
        for bad in ["", "QQ", "Q===", "QQ==QQ==", "Q!==", "QQ=A"] {
            assert_eq!(decode_base64(bad), None, "{bad}");
        }
    }

    #[test]
    fn accepts_good_keys() {
        let k = PublicKey::parse(&host(), ED25519).unwrap();
        assert_eq!(k.kind(), "ssh-ed25519");
        assert!(k.authorized_line().starts_with("restrict ssh-ed25519 AAAA"));
        assert!(k.authorized_line().ends_with(" alpha@test"));
        PublicKey::parse(&host(), &rsa(2048)).unwrap();
        PublicKey::parse(&host(), &rsa(4096)).unwrap();
        PublicKey::parse(&host(), &ecdsa("nistp256", "nistp256", 32)).unwrap();
        PublicKey::parse(&host(), &ecdsa("nistp384", "nistp384", 48)).unwrap();
        PublicKey::parse(&host(), &ecdsa("nistp521", "nistp521", 66)).unwrap();
        PublicKey::parse(&host(), &format!("  {ED25519}\n")).unwrap();
    }

    #[test]
    fn refuses_bad_keys() {
        let err = |k: &str| PublicKey::parse(&host(), k).unwrap_err();
        assert!(matches!(err(""), KeyError::Empty { .. }));
        assert!(matches!(
            err(&format!("{ED25519}\n{ED25519_B}")),
            KeyError::MultiLine { .. }
        ));
        assert!(matches!(err("ssh-dss AAAA"), KeyError::Type { .. }));
        assert!(matches!(
            err(&format!("restrict {ED25519}")),
            KeyError::Type { .. }
        ));
        assert!(matches!(err("ssh-ed25519"), KeyError::Missing { .. }));
        assert!(matches!(
            err("ssh-ed25519 AAAA*AAA"),
            KeyError::Base64 { .. }
        ));
        let e = err(&rsa(1024));
        assert_eq!(
            e.to_string(),
            "host web: RSA key has 1024 bits; at least 2048 are required"
        );
        // An ed25519 blob declared as rsa.
        let blob = ED25519.split(' ').nth(1).unwrap();
        let e = err(&format!("ssh-rsa {blob}"));
        assert!(matches!(e, KeyError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("host web"), "{e}");
        // A wrong curve inside, a truncated key, trailing bytes.
        assert!(matches!(
            err(&ecdsa("nistp256", "nistp384", 32)),
            KeyError::Blob { .. }
        ));
        assert!(matches!(
            err(&ecdsa("nistp384", "nistp384", 32)),
            KeyError::Blob { .. }
        ));
        let mut blob = Vec::new();
        string(&mut blob, b"ssh-ed25519");
        string(&mut blob, &[1; 31]);
        assert!(matches!(
            err(&format!("ssh-ed25519 {}", b64(&blob))),
            KeyError::Blob { .. }
        ));
        let mut blob = Vec::new();
        string(&mut blob, b"ssh-ed25519");
        string(&mut blob, &[1; 32]);
        blob.push(0);
        assert!(matches!(
            err(&format!("ssh-ed25519 {}", b64(&blob))),
            KeyError::Blob { .. }
        ));
        // A compressed point: valid SEC1, but not what OpenSSH writes or accepts.
        let mut blob = Vec::new();
        string(&mut blob, b"ecdsa-sha2-nistp256");
        string(&mut blob, b"nistp256");
        let mut point = vec![2u8];
        point.extend([7; 32]);
        string(&mut blob, &point);
        let e = err(&format!("ecdsa-sha2-nistp256 {}", b64(&blob)));
        assert!(e.to_string().contains("uncompressed"), "{e}");
        assert!(matches!(
            err("ssh-ed25519 AAAA\u{7}bell"),
            KeyError::Control { .. }
        ));
    }

    #[test]
    fn duplicate_keys_name_both_hosts() {
        let toml = format!(
            "[hosts.alpha]\nkey = \"{ED25519}\"\n[hosts.beta]\nkey = \"{} other-comment\"\n[hosts.gamma]\nkey = \"{ED25519_B}\"\n[hosts.delta]\n",
            ED25519.rsplit_once(' ').unwrap().0
        );
        let config = FleetConfig::parse(&toml, std::path::Path::new("bento.toml")).unwrap();
        let err = fleet_keys(&config).unwrap_err();
        assert_eq!(
            err.to_string(),
            "hosts alpha and beta have the same key; each host needs its own (one host could otherwise read the other's secrets)"
        );
        let toml = format!("[hosts.alpha]\nkey = \"{ED25519}\"\n[hosts.delta]\n");
        let config = FleetConfig::parse(&toml, std::path::Path::new("bento.toml")).unwrap();
        let keys = fleet_keys(&config).unwrap();
        assert!(keys[&HostName::new("delta").unwrap()].is_none());
    }
}
