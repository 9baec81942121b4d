//! Encrypted `files` entries: the age format as both sides use it. The server encrypts to
//! recipients (a host's `ssh-ed25519` key, the admins' keys) and reads only an age file's
//! header (which recipients it is for); the agent and the admin tools decrypt with an
//! identity file. Plaintext never passes through this module on the server during publish
//! except to be encrypted.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// How a `files` entry's object is encrypted (`"encrypted"` in the manifest; absent when the
/// object is the plaintext itself, which keeps unencrypted manifests byte-identical).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    /// An age file (binary or armored); the host decrypts it with its `identity_file`.
    Age,
}

/// The suffix that marks an age file under `files/`; the target drops it.
pub const AGE_SUFFIX: &str = ".age";

/// An age header larger than this is refused (a header lists recipients, not data).
const MAX_HEADER_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("not an age file: {0}")]
    NotAge(String),
    #[error("{0}")]
    Decrypt(String),
    #[error("not a recipient (an `ssh-ed25519 …`, `ssh-rsa …` or `age1…` public key): {0:?}")]
    BadRecipient(String),
    #[error("identity {path}: {message}")]
    Identity { path: String, message: String },
    #[error("encrypting: {0}")]
    Encrypt(String),
}

/// One recipient stanza of an age header, as far as bento compares them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stanza {
    /// `ssh-ed25519` or `ssh-rsa`, with the key's tag (4 bytes of its sha256, base64).
    Ssh { kind: String, tag: String },
    /// `X25519` (an `age1…` recipient): the header does not say which key.
    X25519,
    /// Anything else that is not grease (scrypt, plugins).
    Other(String),
}

/// A parsed recipient, with its canonical text (`type base64`, no comment).
pub struct Recipient {
    pub text: String,
    pub stanza: Stanza,
    inner: Box<dyn age::Recipient + Send>,
}

impl std::fmt::Debug for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Recipient {
    /// Parses an OpenSSH public key line (`ssh-ed25519 AAAA… comment`) or an `age1…` key.
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        let s = s.trim();
        let bad = || SecretError::BadRecipient(s.chars().take(120).collect());
        if s.starts_with("age1") {
            let r: age::x25519::Recipient = s.parse().map_err(|_| bad())?;
            return Ok(Self {
                text: r.to_string(),
                stanza: Stanza::X25519,
                inner: Box::new(r),
            });
        }
        let r: age::ssh::Recipient = s.parse().map_err(|_| bad())?;
        let text = r.to_string();
        let (kind, b64) = text.split_once(' ').ok_or_else(bad)?;
        let wire = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad())?;
        Ok(Self {
            stanza: Stanza::Ssh {
                kind: kind.to_owned(),
                tag: ssh_tag(&wire),
            },
            text,
            inner: Box::new(r),
        })
    }
}

/// The tag age puts in an SSH recipient stanza: the first 4 bytes of the sha256 of the
/// key's wire encoding, base64 without padding.
fn ssh_tag(wire: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(&Sha256::digest(wire)[..4])
}

/// True when `bytes` starts like an age file (binary or armored).
pub fn looks_like_age(bytes: &[u8]) -> bool {
    let trimmed = bytes.trim_ascii_start();
    trimmed.starts_with(b"age-encryption.org/")
        || trimmed.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----")
}

/// True when the file is armored (so a rewrite keeps it text).
pub fn is_armored(bytes: &[u8]) -> bool {
    bytes
        .trim_ascii_start()
        .starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----")
}

/// The recipient stanzas of an age file's header, sorted (grease stanzas left out).
pub fn stanzas(bytes: &[u8]) -> Result<Vec<Stanza>, SecretError> {
    if !looks_like_age(bytes) {
        return Err(SecretError::NotAge("no age header".into()));
    }
    let mut reader = BufReader::new(age::armor::ArmoredReader::new(bytes));
    let mut line = Vec::new();
    let mut read = 0;
    let mut out = Vec::new();
    let mut first = true;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| SecretError::NotAge(e.to_string()))?;
        read += n;
        if n == 0 || read > MAX_HEADER_BYTES {
            return Err(SecretError::NotAge("the header does not end".into()));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if first {
            if text != "age-encryption.org/v1" {
                return Err(SecretError::NotAge(format!(
                    "unknown version line {text:?}"
                )));
            }
            first = false;
            continue;
        }
        if text.starts_with("---") {
            break;
        }
        let Some(rest) = text.strip_prefix("-> ") else {
            continue; // a stanza body line
        };
        let mut args = rest.split(' ');
        let kind = args.next().unwrap_or_default();
        out.push(match kind {
            "ssh-ed25519" | "ssh-rsa" => Stanza::Ssh {
                kind: kind.to_owned(),
                tag: args.next().unwrap_or_default().to_owned(),
            },
            "X25519" => Stanza::X25519,
            k if k.ends_with("-grease") => continue,
            k => Stanza::Other(k.to_owned()),
        });
    }
    out.sort();
    Ok(out)
}

/// True when the file's header has a stanza for `recipient` (always true for an `age1…`
/// recipient with any X25519 stanza: the header cannot tell those apart).
pub fn is_for(stanzas: &[Stanza], recipient: &Recipient) -> bool {
    stanzas.contains(&recipient.stanza)
}

/// True when the header's stanzas are exactly those of `recipients`.
pub fn is_exactly_for(stanzas: &[Stanza], recipients: &[Recipient]) -> bool {
    let mut want: Vec<Stanza> = recipients.iter().map(|r| r.stanza.clone()).collect();
    want.sort();
    want == stanzas
}

/// Encrypts `plain` to every recipient; `armor` writes the text form.
pub fn encrypt(
    plain: &[u8],
    recipients: &[Recipient],
    armor: bool,
) -> Result<Vec<u8>, SecretError> {
    let err = |e: &dyn std::fmt::Display| SecretError::Encrypt(e.to_string());
    let encryptor = age::Encryptor::with_recipients(
        recipients
            .iter()
            .map(|r| r.inner.as_ref() as &dyn age::Recipient),
    )
    .map_err(|e| err(&e))?;
    let format = if armor {
        age::armor::Format::AsciiArmor
    } else {
        age::armor::Format::Binary
    };
    let out = age::armor::ArmoredWriter::wrap_output(Vec::new(), format).map_err(|e| err(&e))?;
    let mut w = encryptor.wrap_output(out).map_err(|e| err(&e))?;
    w.write_all(plain).map_err(|e| err(&e))?;
    w.finish()
        .and_then(|armored| armored.finish())
        .map_err(|e| err(&e))
}

/// Identities read from one file: an OpenSSH private key (ed25519 or RSA, not
/// passphrase-protected) or an age identity file (`AGE-SECRET-KEY-1…` lines).
pub struct Identities(Vec<Box<dyn age::Identity + Send + Sync>>);

impl Identities {
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let err = |message: String| SecretError::Identity {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
            match age::ssh::Identity::from_buffer(&bytes[..], Some(path.display().to_string())) {
                Ok(id @ age::ssh::Identity::Unencrypted(_)) => Ok(Self(vec![Box::new(id)])),
                Ok(age::ssh::Identity::Encrypted(_)) => Err(err(
                    "the key is passphrase-protected; bento needs an unencrypted key (the agent runs unattended)".into(),
                )),
                Ok(age::ssh::Identity::Unsupported(_)) => {
                    Err(err("this SSH key type cannot decrypt age files".into()))
                }
                Err(e) => Err(err(e.to_string())),
            }
        } else {
            let ids = age::IdentityFile::from_buffer(&bytes[..])
                .map_err(|e| err(e.to_string()))?
                .into_identities()
                .map_err(|e| err(e.to_string()))?;
            if ids.is_empty() {
                return Err(err("no identity in the file".into()));
            }
            Ok(Self(ids))
        }
    }

    /// Decrypts an age file (binary or armored).
    pub fn decrypt(&self, bytes: &[u8]) -> Result<Vec<u8>, SecretError> {
        if !looks_like_age(bytes) {
            return Err(SecretError::NotAge("no age header".into()));
        }
        let err = |e: &dyn std::fmt::Display| SecretError::Decrypt(e.to_string());
        let reader = BufReader::new(age::armor::ArmoredReader::new(bytes));
        let decryptor = age::Decryptor::new_buffered(reader).map_err(|e| err(&e))?;
        let mut out = Vec::new();
        decryptor
            .decrypt(self.0.iter().map(|i| i.as_ref() as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => {
                    SecretError::Decrypt("not encrypted to this identity".into())
                }
                e => err(&e),
            })?
            .read_to_end(&mut out)
            .map_err(|e| err(&e))?;
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh ed25519 key: (private key file in `dir`, public key line).
    pub(crate) fn keypair(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
        let key = ssh_key::PrivateKey::random(&mut rand_core(), ssh_key::Algorithm::Ed25519)
            .expect("generate key");
        let path = dir.join(name);
        std::fs::write(
            &path,
            key.to_openssh(ssh_key::LineEnding::LF).unwrap().as_bytes(),
        )
        .unwrap();
        (path, key.public_key().to_openssh().unwrap())
    }

    fn rand_core() -> ssh_key::rand_core::OsRng {
        ssh_key::rand_core::OsRng
    }

    #[test]
    fn round_trip_to_an_ssh_key_and_only_that_key() {
        let t = tempfile::tempdir().unwrap();
        let (a_key, a_pub) = keypair(t.path(), "a");
        let (b_key, _) = keypair(t.path(), "b");
        let a = Recipient::parse(&format!("{a_pub} a@host")).unwrap();
        for armor in [false, true] {
            let ct = encrypt(b"hunter2\n", std::slice::from_ref(&a), armor).unwrap();
            assert_eq!(is_armored(&ct), armor);
            assert!(!ct.windows(7).any(|w| w == b"hunter2"));
            let st = stanzas(&ct).unwrap();
            assert!(is_for(&st, &a), "{st:?}");
            assert!(is_exactly_for(&st, std::slice::from_ref(&a)), "{st:?}");
            let plain = Identities::load(&a_key).unwrap().decrypt(&ct).unwrap();
            assert_eq!(plain, b"hunter2\n");
            let err = Identities::load(&b_key).unwrap().decrypt(&ct).unwrap_err();
            assert!(
                err.to_string().contains("not encrypted to this identity"),
                "{err}"
            );
        }
    }

    #[test]
    fn headers_name_their_recipients() {
        let t = tempfile::tempdir().unwrap();
        let (_, a_pub) = keypair(t.path(), "a");
        let (_, b_pub) = keypair(t.path(), "b");
        let a = Recipient::parse(&a_pub).unwrap();
        let b = Recipient::parse(&b_pub).unwrap();
        let ct = encrypt(b"x", std::slice::from_ref(&a), false).unwrap();
        let st = stanzas(&ct).unwrap();
        assert!(!is_for(&st, &b));
        assert!(!is_exactly_for(
            &st,
            &[Recipient::parse(&a_pub).unwrap(), b]
        ));
        assert!(stanzas(b"plain text").is_err());
        assert!(Recipient::parse("ssh-ed25519 nonsense").is_err());
        assert!(Recipient::parse("age1zzz").is_err());
    }
}
