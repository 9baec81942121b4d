//! S3 credentials, as every S3 tool reads them: a file in the AWS shared-credentials format
//! (`[default]` with `aws_access_key_id` and `aws_secret_access_key`), or the environment's
//! `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
//!
//! Invariant: the secret never appears in a `Debug` or error text.

use std::fmt;
use std::path::Path;

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
    /// `aws_session_token` / `AWS_SESSION_TOKEN`, for temporary credentials.
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read the S3 credentials file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("S3 credentials file {path}: {message}")]
    Parse {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("no S3 credentials: name a credentials file, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")]
    Missing,
}

impl Credentials {
    /// The `[default]` profile of a shared-credentials file's text.
    pub fn parse(text: &str, path: &Path) -> Result<Self, CredentialsError> {
        let err = |message: String| CredentialsError::Parse {
            path: path.to_owned(),
            message,
        };
        let mut section: Option<&str> = None;
        let (mut id, mut secret, mut token) = (None, None, None);
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[') {
                let name = name
                    .strip_suffix(']')
                    .ok_or_else(|| err(format!("line {}: unclosed section", n + 1)))?;
                section = Some(name.trim());
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| err(format!("line {}: expected key = value", n + 1)))?;
            if section != Some("default") {
                continue;
            }
            let v = v.trim().to_owned();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
        match (id, secret) {
            (Some(access_key), Some(secret_key))
                if !access_key.is_empty() && !secret_key.is_empty() =>
            {
                Ok(Credentials {
                    access_key,
                    secret_key,
                    session_token: token.filter(|t| !t.is_empty()),
                })
            }
            _ => Err(err(
                "needs a [default] section with aws_access_key_id and aws_secret_access_key".into(),
            )),
        }
    }

    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) as `get` gives
    /// them (the process environment in use; a map in tests).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        Some(Credentials {
            access_key: nonempty("AWS_ACCESS_KEY_ID")?,
            secret_key: nonempty("AWS_SECRET_ACCESS_KEY")?,
            session_token: nonempty("AWS_SESSION_TOKEN"),
        })
    }

    /// The file when one is named, else the environment.
    pub fn resolve(file: Option<&Path>) -> Result<Self, CredentialsError> {
        match file {
            Some(path) => Self::load(path),
            None => Self::from_env(|k| std::env::var(k).ok()).ok_or(CredentialsError::Missing),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Credentials, CredentialsError> {
        Credentials::parse(t, Path::new("/etc/bento/s3-credentials"))
    }

    #[test]
    fn the_default_profile_is_read() {
        let c = parse(
            "# written by bento\n[other]\naws_access_key_id = NOPE\naws_secret_access_key = nope\n\n[default]\naws_access_key_id=AKIDALPHA\n  aws_secret_access_key = s3cr3t/with+chars=\n",
        )
        .unwrap();
        assert_eq!(c.access_key, "AKIDALPHA");
        assert_eq!(c.secret_key, "s3cr3t/with+chars=");
        assert_eq!(c.session_token, None);
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_file_without_both_keys_names_the_file() {
        for bad in [
            "",
            "[default]\naws_access_key_id = A\n",
            "[other]\naws_access_key_id = A\naws_secret_access_key = B\n",
            "[default\naws_access_key_id = A\n",
            "[default]\naws_access_key_id A\n",
            "[default]\naws_access_key_id =\naws_secret_access_key = B\n",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("/etc/bento/s3-credentials"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_environment_needs_both_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = Credentials::from_env(env(&[
            ("AWS_ACCESS_KEY_ID", "A"),
            ("AWS_SECRET_ACCESS_KEY", "B"),
        ]))
        .unwrap();
        assert_eq!((c.access_key.as_str(), c.secret_key.as_str()), ("A", "B"));
        assert!(Credentials::from_env(env(&[("AWS_ACCESS_KEY_ID", "A")])).is_none());
        assert!(Credentials::from_env(env(&[
            ("AWS_ACCESS_KEY_ID", "A"),
            ("AWS_SECRET_ACCESS_KEY", "")
        ]))
        .is_none());
    }
}
