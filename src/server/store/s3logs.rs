//! What hosts wrote to an object store (their `logs/`, or the `[server] reports` location),
//! as the publisher reads it: one level listed at a time, bounded reads, and the
//! publisher's cache of the newest files (`heartbeat.json`, `latest.json`) for conditional
//! GETs, so a `bento status` that finds nothing new costs a 304 per file and no body.
//!
//! Invariants: the cache is the publisher's own (root-only files under its state, one per
//! host and name, written whole and atomically) and holds exactly what the engine answered
//! with an ETag, reused only when the engine says that ETag is still current; a file is read
//! whole only while status reads that host, so memory does not grow with the fleet or with
//! a host's history (older reports are never listed or read by status).

use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::{LogEntry, LogsError};
use crate::protocol::layout::Chroot;
use crate::protocol::HostName;
use crate::server::logs::MAX_LOG_BYTES;
use crate::sys::atomic;
use crate::sys::s3::{Client, Got, Location, S3Error};

/// The cache's directory in the publisher's state directory: `<host>/<name>`.
pub const CACHE_DIR: &str = "s3-reports";

/// What a cached file starts with (one JSON line), before the body.
#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    /// The `[server] store` the file was read from.
    store: String,
    etag: String,
    /// `Last-Modified`, in seconds since the epoch.
    modified: Option<u64>,
}

/// The publisher's cache of the hosts' newest files.
#[derive(Debug)]
pub struct ReportCache {
    state: Chroot,
    store: String,
}

/// A file as the engine last gave it.
struct Cached {
    etag: String,
    modified: Option<SystemTime>,
    body: Vec<u8>,
}

impl ReportCache {
    pub fn new(state: &Chroot, store: &str) -> Self {
        Self {
            state: state.clone(),
            store: store.to_owned(),
        }
    }

    fn path(&self, host: &HostName, name: &str) -> PathBuf {
        self.state
            .state_dir()
            .join(CACHE_DIR)
            .join(host.as_str())
            .join(name)
    }

    fn get(&self, host: &HostName, name: &str) -> Option<Cached> {
        use std::io::Read;
        let file = std::fs::File::open(self.path(host, name)).ok()?;
        let mut bytes = Vec::new();
        // The header line is short; the body was bounded when it was read.
        file.take(MAX_LOG_BYTES + 4096)
            .read_to_end(&mut bytes)
            .ok()?;
        let split = bytes.iter().position(|&b| b == b'\n')?;
        let header: Header = serde_json::from_slice(&bytes[..split]).ok()?;
        (header.store == self.store).then(|| Cached {
            etag: header.etag,
            modified: header
                .modified
                .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
            body: bytes.split_off(split + 1),
        })
    }

    /// Keeps what the engine answered (best effort: a lost entry costs one full read).
    fn put(
        &self,
        host: &HostName,
        name: &str,
        etag: &str,
        modified: Option<SystemTime>,
        body: &[u8],
    ) {
        use std::os::unix::fs::DirBuilderExt;
        if !self.state.state_dir().is_dir() {
            return;
        }
        let header = Header {
            store: self.store.clone(),
            etag: etag.to_owned(),
            modified: modified
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
        };
        let mut bytes = serde_json::to_vec(&header).expect("header serialises");
        bytes.push(b'\n');
        bytes.extend_from_slice(body);
        let path = self.path(host, name);
        let written = path
            .parent()
            .ok_or_else(|| io::Error::other("no parent"))
            .and_then(|dir| {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
            })
            .and_then(|()| atomic::write_file(&path, &bytes, 0o600));
        if let Err(e) = written {
            tracing::debug!("cannot cache {}: {e}", path.display());
        }
    }

    fn forget(&self, host: &HostName, name: &str) {
        let _ = std::fs::remove_file(self.path(host, name));
    }
}

fn logs_err(at: String) -> impl FnOnce(S3Error) -> LogsError {
    move |e| match e {
        S3Error::TooLarge { limit, .. } => LogsError::TooLarge {
            path: PathBuf::from(at),
            max: limit,
        },
        other => LogsError::Io {
            path: PathBuf::from(at),
            source: io::Error::other(other.to_string()),
        },
    }
}

fn plain(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && s != "." && s != ".."
}

/// Lists `logs/` (or `logs/<dir>/`) one level deep.
pub(super) fn list(
    client: &Client,
    l: &Location,
    dir: Option<&str>,
) -> Result<Vec<LogEntry>, LogsError> {
    let base = match dir {
        None => l.list_prefix(),
        Some(sub) => {
            if sub.is_empty() || sub.contains('/') || sub.starts_with('.') {
                return Err(LogsError::BadName { name: sub.into() });
            }
            format!("{}{sub}/", l.list_prefix())
        }
    };
    let at = format!("s3://{}/{base}", l.bucket);
    let listed = client.list_level(&l.bucket, &base).map_err(logs_err(at))?;
    let mut entries: Vec<LogEntry> = listed
        .into_iter()
        .filter_map(|e| {
            let name = e.key.strip_prefix(&base)?;
            // Deeper keys are a subdirectory's, listed with it.
            (!name.is_empty() && !name.contains('/')).then(|| LogEntry {
                name: name.to_owned(),
                size: e.size,
                refused: None,
                modified: e.modified,
            })
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

fn not_found(at: String) -> LogsError {
    LogsError::Io {
        path: PathBuf::from(at),
        source: io::ErrorKind::NotFound.into(),
    }
}

/// Reads `logs/<name>` (or `logs/<dir>/<name>`), bounded.
pub(super) fn read(
    client: &Client,
    l: &Location,
    dir: Option<&str>,
    name: &str,
) -> Result<Vec<u8>, LogsError> {
    if !plain(name) || dir.is_some_and(|d| !plain(d)) {
        return Err(LogsError::BadName { name: name.into() });
    }
    let rel = dir.map_or_else(|| name.to_owned(), |d| format!("{d}/{name}"));
    let key = l.key(&rel);
    let at = format!("s3://{}/{key}", l.bucket);
    match client
        .get(&l.bucket, &key, MAX_LOG_BYTES, None)
        .map_err(logs_err(at.clone()))?
    {
        Got::Body { bytes, .. } => Ok(bytes),
        Got::NotFound | Got::NotModified => Err(not_found(at)),
    }
}

/// Reads `logs/<name>` with when the engine received it, asking with the ETag of the copy
/// in `cache` and answering from that copy when the engine says it is unchanged.
pub(super) fn read_received(
    client: &Client,
    l: &Location,
    cache: &ReportCache,
    host: &HostName,
    name: &str,
) -> Result<(Vec<u8>, Option<SystemTime>), LogsError> {
    if !plain(name) {
        return Err(LogsError::BadName { name: name.into() });
    }
    let key = l.key(name);
    let at = format!("s3://{}/{key}", l.bucket);
    let cached = cache.get(host, name);
    let got = client
        .get(
            &l.bucket,
            &key,
            MAX_LOG_BYTES,
            cached.as_ref().map(|c| c.etag.as_str()),
        )
        .map_err(logs_err(at.clone()));
    match got {
        Ok(Got::Body {
            bytes,
            etag,
            modified,
        }) => {
            match etag {
                Some(etag) => cache.put(host, name, &etag, modified, &bytes),
                None => cache.forget(host, name),
            }
            Ok((bytes, modified))
        }
        Ok(Got::NotModified) => match cached {
            Some(c) => Ok((c.body, c.modified)),
            // Only asked conditionally with a copy in hand.
            None => Err(not_found(at)),
        },
        Ok(Got::NotFound) => {
            cache.forget(host, name);
            Err(not_found(at))
        }
        Err(e) => {
            if matches!(e, LogsError::TooLarge { .. }) {
                cache.forget(host, name);
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_report_is_kept_with_its_etag_per_store_and_survives_any_body() {
        let tmp = tempfile::tempdir().unwrap();
        let state = Chroot::new(tmp.path());
        std::fs::create_dir_all(state.state_dir()).unwrap();
        let cache = ReportCache::new(&state, "s3://a");
        let alpha = HostName::new("alpha").unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        // A body with newlines and bytes that are not text comes back as it was.
        let body = b"{\n\"a\": 1}\n\xff";
        cache.put(&alpha, "latest.json", "\"e1\"", Some(t), body);
        let c = cache.get(&alpha, "latest.json").unwrap();
        assert_eq!(
            (c.etag.as_str(), c.modified, c.body.as_slice()),
            ("\"e1\"", Some(t), &body[..])
        );
        assert!(cache.get(&alpha, "heartbeat.json").is_none());
        // Another store's copy is not this one's.
        assert!(ReportCache::new(&state, "s3://b")
            .get(&alpha, "latest.json")
            .is_none());
        cache.forget(&alpha, "latest.json");
        assert!(cache.get(&alpha, "latest.json").is_none());
    }
}
