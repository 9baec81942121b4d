//! `[secrets]` in bento.toml: the settings of secrets at rest (what `server::secrets` does
//! with them is there). Recipients are checked to parse when bento.toml is loaded.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use crate::protocol::secret::Recipient;

/// `[secrets] encrypt`: what publish does with `files/` entries that are not `.age` files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EncryptMode {
    /// `false` (the default): stored and shipped in the clear.
    #[default]
    Off,
    /// `true`: encrypted to the host's key (and the recipients) as they are published.
    OnPublish,
    /// `"required"`: refused; every `files/` entry must be a `.age` file.
    Required,
}

impl<'de> Deserialize<'de> for EncryptMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(false) => Ok(Self::Off),
            Raw::Bool(true) => Ok(Self::OnPublish),
            Raw::Text(t) if t == "required" => Ok(Self::Required),
            Raw::Text(t) => Err(serde::de::Error::custom(format!(
                "encrypt = {t:?}: use true, false or \"required\""
            ))),
        }
    }
}

/// The keys of `[secrets]`.
pub const SECRETS_KEYS: [&str; 3] = ["encrypt", "recipients", "identity"];

/// `[secrets]` in bento.toml.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    #[serde(default)]
    pub encrypt: EncryptMode,
    /// Public keys every secret is also encrypted to (the admins': `ssh-ed25519 …` or
    /// `age1…`), so `bento secret edit|show|rekey` can decrypt them.
    #[serde(default, deserialize_with = "de_recipients")]
    pub recipients: Vec<String>,
    /// The admin's identity for `bento secret` (default `~/.ssh/id_ed25519`).
    #[serde(default)]
    pub identity: Option<PathBuf>,
}

fn de_recipients<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let keys = Vec::<String>::deserialize(d)?;
    for k in &keys {
        Recipient::parse(k).map_err(|e| serde::de::Error::custom(format!("recipients: {e}")))?;
    }
    Ok(keys)
}
