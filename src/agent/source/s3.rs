//! `s3://`: the host's files in an S3-compatible object store (its prefix or its bucket),
//! read with the host's own credentials, which may read and list that place and write only
//! its `logs/` (or the `reports` location). The keys are the chroot's, byte for byte.
//!
//! Invariants: the credentials file is root's alone (0600) and never in the world-readable
//! Nix store; a key the engine does not have yet is [`RemoteError::NotFound`] (a replicated
//! engine may lag behind `current`: the run stops without a report and the next one tries
//! again); parallel reads stay within [`super::PARALLEL_FETCHES`].

use std::path::{Path, PathBuf};

use super::parallel::Requests;
use super::{Connection, Item, LogItem, ObjectPart, RemoteError, Sink, SshOptions};
use crate::protocol::layout::LOGS;
use crate::sys::s3::{Client, Credentials, Got, Location, Options, PutMode, S3Error};

/// What an `s3://` server needs beside its URL (agent.toml's `credentials_file`,
/// `reports`, `ca_file`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// The AWS shared-credentials file; `None`: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`.
    pub credentials_file: Option<PathBuf>,
    /// Where the host writes what the chroot's `logs/` holds, when not `<prefix>/logs/`.
    pub reports: Option<Location>,
    /// A PEM file pinning the endpoint's CA.
    pub ca_file: Option<PathBuf>,
    /// Seconds added to the local clock until the engine's `Date` corrects it (tests).
    pub clock_offset: i64,
}

pub struct S3Connection {
    client: Client,
    /// The host's files.
    files: Location,
    /// Where its logs go.
    logs: Location,
    server: String,
}

impl S3Connection {
    pub fn connect(location: &Location, opts: &SshOptions) -> Result<Self, RemoteError> {
        let server = location.to_string();
        let connect_err = |message: String| RemoteError::Connect {
            server: server.clone(),
            message,
        };
        let s3 = &opts.s3;
        let creds = match &s3.credentials_file {
            Some(path) => {
                check_private(path).map_err(connect_err)?;
                Credentials::load(path).map_err(|e| connect_err(e.to_string()))?
            }
            None => Credentials::resolve(None).map_err(|e| {
                connect_err(format!(
                    "{e} (agent.toml: credentials_file = \"/etc/bento/s3-credentials\")"
                ))
            })?,
        };
        let client = Client::new(
            &location.endpoint,
            &location.region,
            &creds,
            &Options {
                stall_timeout: opts.stall_timeout,
                deadline: opts.deadline,
                ca_file: s3.ca_file.clone(),
                clock_offset: s3.clock_offset,
            },
        )
        .map_err(|e| connect_err(e.to_string()))?;
        let logs = match &s3.reports {
            Some(r) => r.clone(),
            None => Location {
                prefix: location.key(LOGS),
                ..location.clone()
            },
        };
        Ok(S3Connection {
            client,
            files: location.clone(),
            logs,
            server,
        })
    }

    fn error(&self, rel: &str, e: S3Error) -> RemoteError {
        match e {
            S3Error::TooLarge { limit, .. } => RemoteError::TooLarge {
                path: rel.to_owned(),
                limit,
            },
            S3Error::Stalled {
                operation, waited, ..
            } => RemoteError::Stalled {
                server: self.server.clone(),
                operation: format!("{operation} {rel}"),
                waited,
            },
            S3Error::Deadline { operation, .. } => RemoteError::RunTimeout {
                server: self.server.clone(),
                operation: format!("{operation} {rel}"),
            },
            e => RemoteError::Remote {
                path: rel.to_owned(),
                message: e.to_string(),
            },
        }
    }
}

impl Requests for S3Connection {
    fn size_of(&self, item: Item) -> Result<Option<u64>, RemoteError> {
        let rel = item.path();
        let key = self.files.key(&rel);
        self.client
            .head(&self.files.bucket, &key)
            .map(|h| h.map(|h| h.size))
            .map_err(|e| self.error(&rel, e))
    }

    fn read_item(&self, item: Item, limit: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        let rel = item.path();
        let key = self.files.key(&rel);
        match self.client.get(&self.files.bucket, &key, limit, None) {
            Ok(Got::Body { bytes, .. }) => Ok(Some(bytes)),
            Ok(Got::NotFound) => Ok(None),
            Ok(Got::NotModified) => Err(RemoteError::Remote {
                path: rel,
                message: "the engine answered 304 to an unconditional read".into(),
            }),
            Err(e) => Err(self.error(&rel, e)),
        }
    }

    fn read_part(&self, part: &ObjectPart) -> Result<u64, RemoteError> {
        let rel = part.item.path();
        let key = self.files.key(&rel);
        let local = |source| RemoteError::Local {
            path: part.dest.clone(),
            source,
        };
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part.dest)
            .map_err(local)?;
        let got = self
            .client
            .get_range(&self.files.bucket, &key, part.from, part.max, &mut out)
            .map_err(|e| match e {
                S3Error::Write { source, .. } => local(source),
                e => self.error(&rel, e),
            })?;
        out.sync_all().map_err(local)?;
        got.ok_or(RemoteError::NotFound { path: rel })
    }
}

impl Sink for S3Connection {
    /// A PUT is atomic on every engine: readers see the old object or the new one.
    fn put(&mut self, item: LogItem<'_>, bytes: &[u8]) -> Result<(), RemoteError> {
        let rel = item.path();
        let key = self.logs.key(&rel);
        self.client
            .put(&self.logs.bucket, &key, bytes, PutMode::Overwrite)
            .map(|_| ())
            .map_err(|e| self.error(&format!("{LOGS}/{rel}"), e))
    }

    fn clock_correction(&self) -> Option<i64> {
        self.client.clock_correction()
    }
}

impl Connection for S3Connection {
    fn close(self: Box<Self>) -> Result<(), RemoteError> {
        Ok(())
    }
}

/// The credentials file must be root's alone and outside the Nix store, like a private key.
fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let named = format!("credentials_file {} (agent.toml)", path.display());
    let real = std::fs::canonicalize(path).map_err(|e| format!("{named}: {e}"))?;
    if real.starts_with("/nix/store") {
        return Err(format!(
            "{named} is in the Nix store, which every user can read: keep it outside (e.g. /etc/bento/s3-credentials, root-owned, mode 0600)"
        ));
    }
    let meta = std::fs::metadata(&real).map_err(|e| format!("{named}: {e}"))?;
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{named} must be owned by root with mode 0600 (it is uid {} mode {:04o}): run chown root: and chmod 600 on it",
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}
