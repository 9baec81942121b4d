//! Secrets at rest on the server: `[secrets]` in bento.toml, sealing a host's `files`
//! entries when it is published (`seal`: `.age` files shipped as they are, plaintext ones
//! encrypted to the host's key and `[secrets] recipients`), and the admin's tools over the
//! fleet repo's `.age` files (`repo`: `bento secret edit | show | rekey | encrypt`). The invariant:
//! with encryption on, nothing publish writes into a chroot or the pool is plaintext.

mod repo;
mod scratch;
mod seal;

use std::path::PathBuf;

use crate::protocol::secret::{Recipient, SecretError};
use crate::protocol::HostName;
use crate::server::fleet::FleetConfig;

pub use crate::server::fleet::secrets::{EncryptMode, SecretsConfig};
pub use repo::{
    edit, encrypt, find_secret, glob_match, rekey, show, EditOutcome, Encrypted, RekeyOutcome,
    RekeyReport, Secret,
};
pub use seal::{seal, seal_as, Sealable, Writes, CACHE_FILE};

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("host {host} has no `key` in bento.toml ([hosts.{host}]): its secrets cannot be encrypted to it")]
    NoKey { host: HostName },
    #[error("host {host}: [hosts.{host}] key in bento.toml: {source}")]
    BadKey { host: HostName, source: SecretError },
    #[error("{file}: [secrets] encrypt = \"required\" refuses a plaintext secret for host {host}; encrypt it (`bento secret edit {host} {path}`) and remove the plaintext")]
    Plaintext {
        file: PathBuf,
        host: HostName,
        path: String,
    },
    #[error("{file} (host {host}): {source}")]
    NotAge {
        file: PathBuf,
        host: HostName,
        source: SecretError,
    },
    #[error("{file} is not encrypted to host {host}'s key ([hosts.{host}] key in bento.toml), so {host} could not decrypt it: run `bento secret rekey --host {host}`")]
    NotForHost { file: PathBuf, host: HostName },
    #[error("host {host}: two files install to {target}: {first} and {second}")]
    SameTarget {
        host: HostName,
        target: String,
        first: String,
        second: String,
    },
    #[error("{file} (host {host}): a .age file needs a name before the suffix")]
    BadTarget { file: PathBuf, host: HostName },
    #[error("{file} changed while it was being published; run publish again")]
    Changed { file: PathBuf },
    #[error("{file} (host {host}): {source}")]
    Encrypt {
        file: PathBuf,
        host: HostName,
        source: SecretError,
    },
    #[error("{file}: cannot decrypt it with {identity}: {source}")]
    Decrypt {
        file: PathBuf,
        identity: PathBuf,
        source: SecretError,
    },
    #[error(transparent)]
    Identity(SecretError),
    #[error("no host named {0} in the fleet")]
    UnknownHost(HostName),
    #[error("--on {0:?} matches no host of the fleet")]
    NoMatch(String),
    #[error("{file}: a plaintext file; `bento secret edit` edits `.age` files (move it to {file}.age with `bento secret edit`, or let [secrets] encrypt = true encrypt it on publish)")]
    IsPlaintext { file: PathBuf },
    #[error("host {host} has no file {path} under {dir}")]
    NoFile {
        host: HostName,
        path: String,
        dir: PathBuf,
    },
    #[error("{file}: cannot encrypt it: {why}")]
    CannotEncrypt { file: PathBuf, why: String },
    #[error("editor {command:?}: {message}")]
    Editor { command: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Who a host's secrets are encrypted to: the host's key, then `[secrets] recipients`
/// (duplicates dropped).
pub fn recipients_for(
    fleet: &FleetConfig,
    host: &HostName,
) -> Result<Vec<Recipient>, SecretsError> {
    let key = fleet
        .hosts
        .get(host)
        .and_then(|h| h.key.as_deref())
        .ok_or_else(|| SecretsError::NoKey { host: host.clone() })?;
    let mut out = vec![
        Recipient::parse(key).map_err(|source| SecretsError::BadKey {
            host: host.clone(),
            source,
        })?,
    ];
    for r in &fleet.secrets.recipients {
        let r = Recipient::parse(r).map_err(SecretsError::Identity)?;
        if !out.iter().any(|o| o.text == r.text) {
            out.push(r);
        }
    }
    Ok(out)
}

/// The host's own key as a recipient, when bento.toml has one.
pub fn host_recipient(
    fleet: &FleetConfig,
    host: &HostName,
) -> Result<Option<Recipient>, SecretsError> {
    match fleet.hosts.get(host).and_then(|h| h.key.as_deref()) {
        None => Ok(None),
        Some(key) => Recipient::parse(key)
            .map(Some)
            .map_err(|source| SecretsError::BadKey {
                host: host.clone(),
                source,
            }),
    }
}

/// The admin's identity file: `--identity`, else `[secrets] identity`, else
/// `~/.ssh/id_ed25519`.
pub fn identity_path(fleet: &FleetConfig, flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| fleet.secrets.identity.clone())
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".ssh/id_ed25519")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn encrypt_takes_a_bool_or_required() {
        let parse = |t: &str| FleetConfig::parse(t, Path::new("bento.toml"));
        assert_eq!(parse("").unwrap().secrets.encrypt, EncryptMode::Off);
        let c = parse("[secrets]\nencrypt = true\n").unwrap();
        assert_eq!(c.secrets.encrypt, EncryptMode::OnPublish);
        let c = parse("[secrets]\nencrypt = \"required\"\n").unwrap();
        assert_eq!(c.secrets.encrypt, EncryptMode::Required);
        for (bad, needle) in [
            ("[secrets]\nencrypt = \"yes\"\n", "required"),
            (
                "[secrets]\nrecipients = [\"ssh-ed25519 AAAA\"]\n",
                "recipients",
            ),
            ("[secrets]\nrecipient = []\n", "recipient"),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("bento.toml"),
                "{bad}: {err}"
            );
        }
    }
}
