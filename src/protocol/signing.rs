//! Signed snapshots: the fleet's ed25519 key in OpenSSH format, and SSH signatures
//! ("SSHSIG", namespace `bento`) over the exact bytes of each manifest, so
//! `ssh-keygen -Y check-novalidate -n bento -s <digest>.sig < <digest>.json` accepts them and
//! a host trusts a manifest only if one of its trusted keys signed it.

use std::path::{Path, PathBuf};

use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

/// The signature namespace: a bento signature cannot be replayed as another tool's.
pub const NAMESPACE: &str = "bento";
/// A signature file larger than this is refused unread.
pub const MAX_SIGNATURE_BYTES: u64 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("{0} already exists; not overwriting a signing key")]
    Exists(PathBuf),
    #[error("trusted key {index} ({text:?}): {message}")]
    Trusted {
        index: usize,
        text: String,
        message: String,
    },
    #[error("the manifest's signature is not valid: {0}")]
    BadSignature(String),
    #[error("the manifest is signed by no trusted key")]
    Untrusted,
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A loaded private signing key.
pub struct Signer {
    key: PrivateKey,
}

impl Signer {
    /// Loads an unencrypted OpenSSH ed25519 private key.
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        let err = |message: String| SigningError::Key {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let key = PrivateKey::from_openssh(text.trim_end().as_bytes())
            .map_err(|e| err(format!("not an OpenSSH private key: {e}")))?;
        if key.is_encrypted() {
            return Err(err("the key is encrypted; publish needs an unencrypted key (keep it root-only instead)".into()));
        }
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(err(format!("the key is {}, not ed25519", key.algorithm())));
        }
        Ok(Self { key })
    }

    pub fn public(&self) -> PublicKey {
        self.key.public_key().clone()
    }

    /// The armored signature of `msg` (the bytes of `<digest>.sig`).
    pub fn sign(&self, msg: &[u8]) -> Result<String, SigningError> {
        let sig = self
            .key
            .sign(NAMESPACE, HashAlg::Sha512, msg)
            .map_err(|e| SigningError::Sign(e.to_string()))?;
        sig.to_pem(LineEnding::LF)
            .map_err(|e| SigningError::Sign(e.to_string()))
    }
}

/// Creates a new key pair at `path` (0600) and `path.pub` (0644); refuses to overwrite.
pub fn generate(path: &Path, comment: &str) -> Result<PublicKey, SigningError> {
    let pub_path = pub_path(path);
    for p in [path, pub_path.as_path()] {
        if p.exists() {
            return Err(SigningError::Exists(p.to_owned()));
        }
    }
    let err = |p: &Path, message: String| SigningError::Key {
        path: p.to_owned(),
        message,
    };
    let mut key = PrivateKey::random(&mut ssh_key::rand_core::OsRng, Algorithm::Ed25519)
        .map_err(|e| err(path, e.to_string()))?;
    key.set_comment(comment);
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| err(path, e.to_string()))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| err(path, e.to_string()))?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| err(parent, e.to_string()))?;
    }
    crate::sys::atomic::write_file(path, private.as_bytes(), 0o600)
        .map_err(|e| err(path, e.to_string()))?;
    crate::sys::atomic::write_file(&pub_path, format!("{public}\n").as_bytes(), 0o644)
        .map_err(|e| err(&pub_path, e.to_string()))?;
    Ok(key.public_key().clone())
}

pub fn pub_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Parses `trusted_keys` lines (`ssh-ed25519 AAAA… comment`).
pub fn parse_trusted(lines: &[String]) -> Result<Vec<PublicKey>, SigningError> {
    lines
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let bad = |message: String| SigningError::Trusted {
                index: i + 1,
                text: text.chars().take(60).collect(),
                message,
            };
            let key = PublicKey::from_openssh(text.trim())
                .map_err(|e| bad(format!("not an OpenSSH public key: {e}")))?;
            if key.algorithm() != Algorithm::Ed25519 {
                return Err(bad(format!(
                    "{} keys are not accepted; bento signs with ed25519",
                    key.algorithm()
                )));
            }
            Ok(key)
        })
        .collect()
}

/// What can be told of `sig` (armored) without the message: a well-formed `bento`
/// signature by one of `trusted`. Returns the signature and its signer. Lets an agent refuse
/// a manifest before downloading it.
pub fn check_signer<'k>(
    trusted: &'k [PublicKey],
    sig: &[u8],
) -> Result<(SshSig, &'k PublicKey), SigningError> {
    let sig = SshSig::from_pem(sig).map_err(|e| SigningError::BadSignature(e.to_string()))?;
    if sig.namespace() != NAMESPACE {
        return Err(SigningError::BadSignature(format!(
            "namespace {:?}, not {NAMESPACE:?}",
            sig.namespace()
        )));
    }
    let signer = trusted.iter().find(|k| k.key_data() == sig.public_key());
    match signer {
        Some(k) => Ok((sig, k)),
        None => Err(SigningError::Untrusted),
    }
}

/// Checks that `sig` (armored) is a `bento` signature of `msg` by one of `trusted`.
pub fn verify(trusted: &[PublicKey], msg: &[u8], sig: &[u8]) -> Result<(), SigningError> {
    let (sig, signer) = check_signer(trusted, sig)?;
    signer
        .verify(NAMESPACE, msg, &sig)
        .map_err(|e| SigningError::BadSignature(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("key");
        let public = generate(&path, "test").unwrap();
        assert!(matches!(
            generate(&path, "again"),
            Err(SigningError::Exists(_))
        ));
        let signer = Signer::load(&path).unwrap();
        let sig = signer.sign(b"manifest bytes").unwrap();
        assert!(sig.starts_with("-----BEGIN SSH SIGNATURE-----"));
        let trusted = parse_trusted(&[public.to_openssh().unwrap()]).unwrap();
        verify(&trusted, b"manifest bytes", sig.as_bytes()).unwrap();
        assert!(matches!(
            verify(&trusted, b"other bytes", sig.as_bytes()),
            Err(SigningError::BadSignature(_))
        ));
        let other = generate(&t.path().join("other"), "o").unwrap();
        let other = parse_trusted(&[other.to_openssh().unwrap()]).unwrap();
        assert!(matches!(
            verify(&other, b"manifest bytes", sig.as_bytes()),
            Err(SigningError::Untrusted)
        ));
        // Several trusted keys (rotation): any one signing is enough.
        let both = [other, trusted].concat();
        verify(&both, b"manifest bytes", sig.as_bytes()).unwrap();
        assert!(verify(&both, b"manifest bytes", b"garbage").is_err());
    }

    #[test]
    fn bad_trusted_keys_are_named() {
        let err = parse_trusted(&["ssh-ed25519 notbase64".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("trusted key 1"), "{err}");
    }
}
