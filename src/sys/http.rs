//! Plain HTTPS reads from a static web server (a mirror of a host's tree): unsigned GETs,
//! HEAD for a size, `Range` for the rest of an interrupted download, over rustls with the
//! system's CA store or a pinned `ca_file`.
//!
//! Invariants: a read never takes more than its limit + 1 bytes off the wire; no request
//! waits longer than `stall_timeout` for a byte nor past the deadline; `http://` is only
//! ever spoken to a loopback address; every error names the URL.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the system keeps its CA bundle when `SSL_CERT_FILE` does not say (NixOS and
/// Debian both have it here).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The most of an error answer read (only to let the connection be reused).
const MAX_ERROR_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url}: answered {status}")]
    Refused { url: String, status: u16 },
    #[error("{url} is larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: no answer to {operation} within {}", humantime::format_duration(*.waited))]
    Stalled {
        url: String,
        operation: &'static str,
        waited: Duration,
    },
    #[error("{url}: the run's deadline passed during {operation}")]
    Deadline {
        url: String,
        operation: &'static str,
    },
    #[error("{url}: {operation}: {message}")]
    Transport {
        url: String,
        operation: &'static str,
        message: String,
    },
    #[error("{url}: writing what was read: {source}")]
    Write { url: String, source: std::io::Error },
    #[error("ca_file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
}

/// How the client reaches the server.
#[derive(Debug, Clone)]
pub struct Options {
    /// The longest one request may wait for its next byte.
    pub stall_timeout: Duration,
    /// No request runs past this moment.
    pub deadline: Option<Instant>,
    /// A PEM file of the CA(s) the server's certificate must chain to, instead of the
    /// system's store.
    pub ca_file: Option<PathBuf>,
}

/// The certificates of a PEM file (a `ca_file`): only certificates, at least one.
pub fn read_pem_certs(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item.map_err(|e| e.to_string())? {
            ureq::tls::PemItem::Certificate(c) => certs.push(c),
            _ => return Err("holds something other than certificates".into()),
        }
    }
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// The trust anchors: `ca_file`; else the system's bundle (`SSL_CERT_FILE`, as OpenSSL and
/// Nix read it, or the distribution's path); else the public web roots built in.
fn roots(ca_file: Option<&Path>) -> Result<ureq::tls::RootCerts, HttpError> {
    if let Some(path) = ca_file {
        let certs = read_pem_certs(path).map_err(|message| HttpError::CaFile {
            path: path.to_owned(),
            message,
        })?;
        return Ok(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    let system = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| Some(PathBuf::from(SYSTEM_CA_BUNDLE)).filter(|p| p.is_file()));
    Ok(match system.and_then(|p| read_pem_certs(&p).ok()) {
        Some(certs) => ureq::tls::RootCerts::new_with_certs(&certs),
        None => ureq::tls::RootCerts::WebPki,
    })
}

/// Whether `host` (as a URL gives it) is this machine: the only place clear text may go.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// One server; paths are relative to its base URL.
pub struct Client {
    base: String,
    agent: ureq::Agent,
    stall: Duration,
    deadline: Option<Instant>,
}

impl Client {
    /// `base` is `https://HOST[:PORT]/PATH` (or `http://` on loopback), without a trailing
    /// slash; the caller checked its form.
    pub fn new(base: &str, options: &Options) -> Result<Self, HttpError> {
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(roots(options.ca_file.as_deref())?)
            .build();
        let stall = Some(options.stall_timeout);
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // A redirect could lead to clear text or another host; a mirror serves in place.
            .max_redirects(0)
            .https_only(!base.starts_with("http://"))
            .tls_config(tls)
            .timeout_connect(stall)
            .timeout_per_read(stall)
            .timeout_per_write(stall)
            .user_agent(concat!("bento/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Client {
            base: base.trim_end_matches('/').to_owned(),
            agent,
            stall: options.stall_timeout,
            deadline: options.deadline,
        })
    }

    fn url(&self, rel: &str) -> String {
        format!("{}/{rel}", self.base)
    }

    /// All of `rel`, at most `limit` bytes; `None` when the server has no such file.
    pub fn get(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>, HttpError> {
        let url = self.url(rel);
        let resp = self.send(&url, "GET", None)?;
        match resp.status().as_u16() {
            200 => {
                if let Some(len) = content_length(&resp) {
                    if len > limit {
                        return Err(HttpError::TooLarge { url, limit });
                    }
                }
                let mut buf = Vec::new();
                body(resp)
                    .take(limit + 1)
                    .read_to_end(&mut buf)
                    .map_err(|e| self.body_error(&url, e))?;
                if buf.len() as u64 > limit {
                    return Err(HttpError::TooLarge { url, limit });
                }
                Ok(Some(buf))
            }
            404 | 410 => Ok(None),
            status => Err(refused(url, resp, status)),
        }
    }

    /// The size of `rel`, `None` when the server has no such file (or does not say).
    pub fn size(&self, rel: &str) -> Result<Option<u64>, HttpError> {
        let url = self.url(rel);
        let resp = self.send(&url, "HEAD", None)?;
        match resp.status().as_u16() {
            200 => Ok(content_length(&resp).or(Some(0))),
            404 | 410 => Ok(None),
            status => Err(refused(url, resp, status)),
        }
    }

    /// Appends bytes `from..from + max` of `rel` (fewer where it ends) to `out`; returns
    /// how many, `None` when the file does not exist.
    pub fn get_range(
        &self,
        rel: &str,
        from: u64,
        max: u64,
        out: &mut dyn Write,
    ) -> Result<Option<u64>, HttpError> {
        if max == 0 {
            return Ok(Some(0));
        }
        let url = self.url(rel);
        let range = format!("bytes={from}-{}", from + max - 1);
        let resp = self.send(&url, "GET", Some(&range))?;
        let skip = match resp.status().as_u16() {
            206 => 0,
            // A server that ignores `Range` sends it all: skip what is already here.
            200 => from,
            // Nothing at or after `from`: the file is not longer than what we have.
            416 => return Ok(Some(0)),
            404 | 410 => return Ok(None),
            status => return Err(refused(url, resp, status)),
        };
        match copy_range(body(resp), skip, max, out) {
            Ok(n) => Ok(Some(n)),
            Err(RangeCopyError::Read(e)) => Err(self.body_error(&url, e)),
            Err(RangeCopyError::Write(source)) => Err(HttpError::Write { url, source }),
        }
    }

    fn send(
        &self,
        url: &str,
        operation: &'static str,
        range: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, HttpError> {
        let left = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        if left == Some(Duration::ZERO) {
            return Err(HttpError::Deadline {
                url: url.to_owned(),
                operation,
            });
        }
        let result = if operation == "HEAD" {
            self.agent
                .head(url)
                .config()
                .timeout_global(left)
                .build()
                .call()
        } else {
            let mut b = self.agent.get(url);
            if let Some(r) = range {
                b = b.header("range", r);
            }
            b.config().timeout_global(left).build().call()
        };
        result.map_err(|e| match e {
            ureq::Error::Timeout(_) if left.is_some_and(|l| l <= self.stall) => {
                HttpError::Deadline {
                    url: url.to_owned(),
                    operation,
                }
            }
            ureq::Error::Timeout(_) => HttpError::Stalled {
                url: url.to_owned(),
                operation,
                waited: self.stall,
            },
            e => HttpError::Transport {
                url: url.to_owned(),
                operation,
                message: e.to_string(),
            },
        })
    }

    fn body_error(&self, url: &str, e: std::io::Error) -> HttpError {
        if e.kind() == std::io::ErrorKind::TimedOut {
            HttpError::Stalled {
                url: url.to_owned(),
                operation: "reading the body",
                waited: self.stall,
            }
        } else {
            HttpError::Transport {
                url: url.to_owned(),
                operation: "reading the body",
                message: e.to_string(),
            }
        }
    }
}

fn body(resp: ureq::http::Response<ureq::Body>) -> impl Read {
    resp.into_body().into_with_config().limit(u64::MAX).reader()
}

fn content_length(resp: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    resp.headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Reads (a bounded part of) a refusal so the connection can be reused.
fn refused(url: String, resp: ureq::http::Response<ureq::Body>, status: u16) -> HttpError {
    let _ = std::io::copy(&mut body(resp).take(MAX_ERROR_BYTES), &mut std::io::sink());
    HttpError::Refused { url, status }
}

/// Why [`copy_range`] stopped: reading the answer or writing the file.
pub enum RangeCopyError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Copies a ranged GET's body into `out`: the first `skip` bytes dropped (a server that
/// ignored `Range` sends the whole object), then at most `max` bytes. The bytes written.
pub fn copy_range(
    mut body: impl std::io::Read,
    skip: u64,
    max: u64,
    out: &mut dyn std::io::Write,
) -> Result<u64, RangeCopyError> {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut skipped, mut n) = (0u64, 0u64);
    while n < max {
        let want = if skipped < skip {
            (skip - skipped).min(buf.len() as u64)
        } else {
            (max - n).min(buf.len() as u64)
        } as usize;
        let got = body.read(&mut buf[..want]).map_err(RangeCopyError::Read)?;
        if got == 0 {
            break;
        }
        if skipped < skip {
            skipped += got as u64;
            continue;
        }
        out.write_all(&buf[..got]).map_err(RangeCopyError::Write)?;
        n += got as u64;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_range_copy_skips_what_an_ignored_range_resent_and_stops_at_its_length() {
        let body: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        let n = copy_range(&body[..], 70_000, 100_000, &mut out)
            .ok()
            .unwrap();
        assert_eq!(n, 100_000);
        assert_eq!(out, body[70_000..170_000]);
        let mut out = Vec::new();
        assert_eq!(copy_range(&body[..10], 4, 100, &mut out).ok(), Some(6));
        assert_eq!(out, body[4..10]);
    }

    use super::*;

    #[test]
    fn only_loopback_hosts_may_have_clear_text() {
        for yes in ["127.0.0.1", "localhost", "[::1]", "::1", "127.0.0.2"] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in ["10.0.0.1", "example.org", "localhost.example.org", "[::2]"] {
            assert!(!is_loopback(no), "{no}");
        }
    }
}
