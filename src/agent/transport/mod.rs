//! How the agent reads its chroot and writes its `logs/`: over SFTP through the system's
//! OpenSSH client (`sftp://`), or from a mounted directory (`file://`, for NFS, sneakernet
//! and tests). Both give the same small, synchronous interface; every path is relative to
//! the host's chroot and fixed by the protocol, never taken from the server.

mod dir;
mod sftp;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use dir::DirTransport;
pub use sftp::SftpTransport;

use crate::protocol::manifest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {server}: {message}")]
    Connect { server: String, message: String },
    #[error("{path} on the server: {message}")]
    Remote { path: String, message: String },
    #[error("{path} on the server: no such file")]
    NotFound { path: String },
    #[error("{path}: {source}")]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} on the server is larger than {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("object {digest}: downloaded content hashes to {actual}")]
    BadObject { digest: Digest, actual: Digest },
}

/// Where the host's chroot is, from `server = "…"` in agent.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerUrl {
    /// `sftp://account@host[:port]`
    Sftp {
        user: String,
        host: String,
        port: u16,
    },
    /// `file:///path` — a directory holding what `<chroot>/<host>/` holds.
    Dir(PathBuf),
}

impl std::str::FromStr for ServerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: a file:// URL needs an absolute path (file:///mnt/bento/alpha)"
                ));
            }
            return Ok(ServerUrl::Dir(PathBuf::from(path)));
        }
        let Some(rest) = s.strip_prefix("sftp://") else {
            return Err(format!(
                "{s:?}: use sftp://account@host[:port] or file:///path"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let Some((user, hostport)) = rest.split_once('@') else {
            return Err(format!(
                "{s:?}: the sftp:// URL needs the account: sftp://bento-alpha@host"
            ));
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("{s:?}: bad port {p:?}"))?;
                (h.trim_start_matches('[').trim_end_matches(']'), port)
            }
            _ => (hostport, 22),
        };
        if user.is_empty() || host.is_empty() || host.contains('/') {
            return Err(format!("{s:?}: use sftp://account@host[:port]"));
        }
        Ok(ServerUrl::Sftp {
            user: user.to_owned(),
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerUrl::Sftp { user, host, port } => write!(f, "sftp://{user}@{host}:{port}"),
            ServerUrl::Dir(p) => write!(f, "file://{}", p.display()),
        }
    }
}

/// SSH settings for `sftp://` servers.
#[derive(Debug, Clone)]
pub struct SshOptions {
    pub identity_file: PathBuf,
    pub known_hosts: PathBuf,
    pub connect_timeout: Duration,
    /// Where the OpenSSH control socket lives (private to root).
    pub control_dir: PathBuf,
}

/// One open connection to the host's chroot.
pub trait Transport {
    /// The text of `current`, or `None` when nothing is published yet.
    fn read_current(&mut self) -> Result<Option<String>, TransportError>;

    /// A whole small file (a manifest), refused above `limit` bytes.
    fn read_small(&mut self, path: &str, limit: u64) -> Result<Vec<u8>, TransportError>;

    /// Downloads objects into `dest_dir/<digest>`, resuming `dest_dir/.partial-<digest>`
    /// files left by an interrupted run, and verifying every hash. Returns bytes fetched.
    fn fetch_objects(
        &mut self,
        objects: &[(Digest, u64)],
        dest_dir: &Path,
    ) -> Result<u64, TransportError>;

    /// Writes `logs/<path>` atomically (temporary file, then rename); creates `logs/reports/`.
    fn write_log(&mut self, path: &str, bytes: &[u8]) -> Result<(), TransportError>;

    /// Closes the connection cleanly.
    fn close(self: Box<Self>) -> Result<(), TransportError>;
}

/// Opens a connection to `url`.
pub fn connect(url: &ServerUrl, ssh: &SshOptions) -> Result<Box<dyn Transport>, TransportError> {
    match url {
        ServerUrl::Dir(path) => Ok(Box::new(DirTransport::open(path)?)),
        ServerUrl::Sftp { user, host, port } => {
            Ok(Box::new(SftpTransport::connect(user, host, *port, ssh)?))
        }
    }
}

/// Name of the partial download of an object.
pub fn partial_name(digest: &Digest) -> String {
    format!(".partial-{digest}")
}

/// Moves a fully downloaded partial file into place after checking its hash.
pub(crate) fn finish_object(dest_dir: &Path, digest: &Digest) -> Result<(), TransportError> {
    let partial = dest_dir.join(partial_name(digest));
    let actual =
        crate::server::snapshot::hash_file(&partial).map_err(|source| TransportError::Local {
            path: partial.clone(),
            source,
        })?;
    if actual != *digest {
        let _ = std::fs::remove_file(&partial);
        return Err(TransportError::BadObject {
            digest: *digest,
            actual,
        });
    }
    let dest = dest_dir.join(digest.to_hex());
    std::fs::rename(&partial, &dest).map_err(|source| TransportError::Local { path: dest, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            "sftp://bento-alpha@bento.example.org:2222"
                .parse::<ServerUrl>()
                .unwrap(),
            ServerUrl::Sftp {
                user: "bento-alpha".into(),
                host: "bento.example.org".into(),
                port: 2222
            }
        );
        assert_eq!(
            "sftp://bento-alpha@10.0.0.1".parse::<ServerUrl>().unwrap(),
            ServerUrl::Sftp {
                user: "bento-alpha".into(),
                host: "10.0.0.1".into(),
                port: 22
            }
        );
        assert_eq!(
            "file:///mnt/bento/alpha".parse::<ServerUrl>().unwrap(),
            ServerUrl::Dir("/mnt/bento/alpha".into())
        );
        for bad in [
            "ftp://x",
            "sftp://host",
            "sftp://a@h:notaport",
            "file://relative",
            "sftp://@h",
        ] {
            assert!(bad.parse::<ServerUrl>().is_err(), "{bad}");
        }
    }
}
