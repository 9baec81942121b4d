//! The agent's two seams to the server: a [`Source`] for what it reads (`current`, a
//! manifest, its signature, objects, the files of a prebuilt system's binary cache — named by
//! protocol operation, never by a path string from the server) and a [`Sink`] for what it writes (reports and the heartbeat in `logs/`).
//! `sftp://` (the system's OpenSSH client), `file://` (a mounted directory: NFS,
//! sneakernet, tests) and `s3://` (an S3-compatible object store, `source::s3`) implement
//! both on one [`Connection`]; `https://` (`source::https`, a static mirror) is read-only,
//! its sink always refusing. `source::mirrored` puts the sources one run reached behind one
//! connection (the chosen one first, the others for objects it lacks).
//!
//! Invariant: a Source only moves bytes. Size limits, resuming partial downloads and hash
//! verification live once, in `agent::fetch`, so every backend gets the same checks.

mod control_dir;
mod dir;
mod https;
mod mirrored;
mod parallel;
mod s3;
mod sftp;

use std::path::PathBuf;
use std::time::Duration;

pub use dir::DirConnection;
pub use https::HttpsConnection;
pub use mirrored::{Mirrored, Reached};
pub use s3::{S3Connection, S3Options};
pub use sftp::SftpConnection;

use crate::protocol::layout;
use crate::protocol::manifest::Digest;
use crate::protocol::report;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
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
    /// No answer to one request within `stall_timeout` (issue #14 item 4: a server whose
    /// packets are silently dropped must not wedge the agent).
    #[error("server stalled: no answer to {operation} for {} ({server})", humantime::format_duration(*.waited))]
    Stalled {
        server: String,
        operation: String,
        waited: Duration,
    },
    #[error("run_timeout reached while waiting for {operation} ({server})")]
    RunTimeout { server: String, operation: String },
    /// A static mirror takes no writes: reports wait in the spool for the server.
    #[error("{server} is read-only: reports stay spooled (agent.toml's `reports` can name a place that takes them)")]
    ReadOnly { server: String },
    /// This run did not reach the place reports go (`server`).
    #[error("{server} was not reached this run: reports stay spooled")]
    NoSink { server: String },
}

impl RemoteError {
    /// Another source may serve what this one did not: the item is missing, the source
    /// refused, cannot be reached or stalled (not a local failure, an oversized file, or the
    /// run's own deadline).
    pub fn may_try_elsewhere(&self) -> bool {
        matches!(
            self,
            RemoteError::Connect { .. }
                | RemoteError::Remote { .. }
                | RemoteError::NotFound { .. }
                | RemoteError::Stalled { .. }
        )
    }

    /// The server stopped answering (as opposed to refusing or cutting the connection).
    pub fn is_stall(&self) -> bool {
        matches!(
            self,
            RemoteError::Stalled { .. } | RemoteError::RunTimeout { .. }
        )
    }
}

/// A file the agent reads, by what it is in the protocol (docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// `current`: the digest of the published version.
    Current,
    /// `manifests/<digest>.json`.
    Manifest(Digest),
    /// `manifests/<digest>.sig`, when the fleet signs.
    Signature(Digest),
    /// `manifests/<digest>.fresh`, the live version's freshness stamp (`[server] freshness`).
    Fresh(Digest),
    /// `objects/<digest>`.
    Object(Digest),
    /// A file of `cache/`, the binary cache of a `build_on = "server"` host.
    Cache(CacheFile),
}

/// A file of `cache/`, by what it is. Built only from validated names (a 32-character Nix
/// hash, a NAR file name `nar/<52-character hash>.nar[.zst|.xz|.bz2]`), so no name from a
/// manifest or a narinfo can make the agent read outside `cache/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheFile {
    /// `cache/nix-cache-info`.
    Info,
    /// `cache/<hash>.narinfo`.
    NarInfo([u8; 32]),
    /// `cache/nar/<hash>.nar<ext>`.
    Nar([u8; 52], NarExt),
}

/// The compression suffix of a NAR file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NarExt {
    None,
    Zstd,
    Xz,
    Bzip2,
}

const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

fn nix32_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes: [u8; N] = s.as_bytes().try_into().ok()?;
    bytes.iter().all(|b| NIX32.contains(b)).then_some(bytes)
}

impl CacheFile {
    /// The narinfo of the store path whose hash part is `hash`.
    pub fn narinfo(hash: &str) -> Option<Self> {
        nix32_array(hash).map(CacheFile::NarInfo)
    }

    /// The NAR file a narinfo's `URL` names, if it has the shape Nix gives it.
    pub fn nar(url: &str) -> Option<Self> {
        let name = url.strip_prefix("nar/")?;
        let (hash, ext) = name.split_once(".nar")?;
        let ext = match ext {
            "" => NarExt::None,
            ".zst" => NarExt::Zstd,
            ".xz" => NarExt::Xz,
            ".bz2" => NarExt::Bzip2,
            _ => return None,
        };
        nix32_array(hash).map(|h| CacheFile::Nar(h, ext))
    }

    /// The path relative to `cache/`.
    pub fn rel(&self) -> String {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match self {
            CacheFile::Info => crate::protocol::layout::CACHE_INFO.to_owned(),
            CacheFile::NarInfo(h) => format!("{}.narinfo", text(h)),
            CacheFile::Nar(h, ext) => {
                let ext = match ext {
                    NarExt::None => "",
                    NarExt::Zstd => ".zst",
                    NarExt::Xz => ".xz",
                    NarExt::Bzip2 => ".bz2",
                };
                format!("nar/{}.nar{ext}", text(h))
            }
        }
    }
}

impl Item {
    /// The path relative to the host's chroot (fixed by the protocol).
    pub fn path(&self) -> String {
        self.key().path()
    }

    /// The protocol's key of this item, the one the server's stores write.
    pub fn key(&self) -> layout::Key {
        match self {
            Item::Current => layout::Key::Current,
            Item::Manifest(d) => layout::Key::Manifest(*d),
            Item::Signature(d) => layout::Key::Signature(*d),
            Item::Fresh(d) => layout::Key::Fresh(*d),
            Item::Object(d) => layout::Key::Object(*d),
            Item::Cache(f) => layout::Key::Cache(
                layout::SubPath::new(&f.rel()).expect("cache file names are plain"),
            ),
        }
    }
}

/// One piece of a download (an object, a NAR): read at most `max` bytes of `item` from
/// offset `from` and append them to the local file `dest` (then fsync it).
#[derive(Debug, Clone)]
pub struct ObjectPart {
    pub item: Item,
    pub from: u64,
    pub max: u64,
    pub dest: PathBuf,
}

/// How many downloads (objects, NARs, narinfos) are in flight at once over one connection:
/// enough to hide round trips on a slow link, few enough to keep memory small.
pub const PARALLEL_FETCHES: usize = 8;

/// What the agent reads from the server.
pub trait Source {
    /// The size of `item`, `None` when it does not exist: lets the fetcher refuse a file
    /// over its limit before downloading any of it.
    fn size(&mut self, item: Item) -> Result<Option<u64>, RemoteError>;

    /// All of `item`, `None` when it does not exist. More than `limit` bytes is `TooLarge`
    /// (a file can grow between `size` and `read`); never more than `limit + 1` are read.
    fn read(&mut self, item: Item, limit: u64) -> Result<Option<Vec<u8>>, RemoteError>;

    /// Downloads every part (in parallel where the backend can); returns the bytes moved.
    fn read_objects(&mut self, parts: &[ObjectPart]) -> Result<u64, RemoteError>;
    /// Each of `items` as [`Source::read`] gives it, in order: concurrently where the
    /// backend can (at most [`PARALLEL_FETCHES`] requests in flight over the one
    /// connection), so many small files cost about one round trip per batch, not one each.
    fn read_many(
        &mut self,
        items: &[Item],
        limit: u64,
    ) -> Result<Vec<Option<Vec<u8>>>, RemoteError> {
        items.iter().map(|i| self.read(*i, limit)).collect()
    }
    /// Each of `items`' size as [`Source::size`] gives it, in order, concurrently as
    /// [`Source::read_many`].
    fn size_many(&mut self, items: &[Item]) -> Result<Vec<Option<u64>>, RemoteError> {
        items.iter().map(|i| self.size(*i)).collect()
    }
}

/// A file the agent writes into its `logs/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogItem<'a> {
    /// `logs/heartbeat.json`.
    Heartbeat,
    /// `logs/latest.json`.
    Latest,
    /// `logs/reports/<id>.json`.
    Report(&'a str),
    /// `logs/reports/<id>.log.gz`.
    ReportLog(&'a str),
}

impl LogItem<'_> {
    /// The path relative to `logs/`.
    pub fn path(&self) -> String {
        match self {
            LogItem::Heartbeat => report::HEARTBEAT_FILE.to_owned(),
            LogItem::Latest => report::LATEST_FILE.to_owned(),
            LogItem::Report(id) => format!("{}/{id}.json", report::REPORTS_DIR),
            LogItem::ReportLog(id) => format!("{}/{id}.log.gz", report::REPORTS_DIR),
        }
    }
}

/// What the agent writes to the server.
pub trait Sink {
    /// Writes `item` atomically (a temporary name, then a rename), so a reader never sees
    /// half a file; creates `logs/reports/` when needed.
    fn put(&mut self, item: LogItem<'_>, bytes: &[u8]) -> Result<(), RemoteError>;

    /// Seconds the server's clock is from this machine's, when the connection had to
    /// correct for it (an object store signs every request with the time): said in the
    /// heartbeat and the report.
    fn clock_correction(&self) -> Option<i64> {
        None
    }
}

/// One open connection to the host's chroot, both ways.
pub trait Connection: Source + Sink {
    /// Closes the connection cleanly.
    fn close(self: Box<Self>) -> Result<(), RemoteError>;
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
    /// `s3://BUCKET/PREFIX?endpoint=URL&region=REGION` — the place in an object store that
    /// holds what `<chroot>/<host>/` holds.
    S3(crate::sys::s3::Location),
    /// `https://HOST[:PORT]/PATH` (`http://` on loopback only) — a static web server
    /// holding what `<chroot>/<host>/` holds; read-only.
    Https(String),
}

impl ServerUrl {
    /// Whether the agent can write its reports there.
    pub fn takes_reports(&self) -> bool {
        !matches!(self, ServerUrl::Https(_))
    }
}

/// `https://HOST[:PORT]/PATH`, or `http://` to a loopback address; no query, no fragment,
/// no user; kept without its trailing slash.
fn parse_https(s: &str) -> Result<ServerUrl, String> {
    let url: url::Url = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let host = url
        .host_str()
        .ok_or_else(|| format!("{s:?}: the URL needs a host"))?;
    if url.scheme() == "http" && !crate::sys::http::is_loopback(host) {
        return Err(format!(
            "{s:?}: http:// sends in clear text and is only for a loopback address (127.0.0.1, ::1, localhost); use https://"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(format!(
            "{s:?}: a mirror URL is https://HOST[:PORT]/PATH to the host's tree, without query, fragment or user"
        ));
    }
    Ok(ServerUrl::Https(
        url.as_str().trim_end_matches('/').to_owned(),
    ))
}

impl std::str::FromStr for ServerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with("s3://") {
            return s.parse().map(ServerUrl::S3).map_err(|e| e.to_string());
        }
        if s.starts_with("https://") || s.starts_with("http://") {
            return parse_https(s);
        }
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
                "{s:?}: use sftp://account@host[:port], s3://BUCKET/PREFIX?endpoint=URL&region=REGION, https://HOST/PATH or file:///path"
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
            ServerUrl::S3(l) => write!(f, "{l}"),
            ServerUrl::Https(u) => f.write_str(u),
        }
    }
}

/// How to connect: SSH settings for `sftp://` servers, the timeouts every server kind
/// keeps, and the object store's settings for `s3://`.
#[derive(Debug, Clone)]
pub struct SshOptions {
    pub identity_file: PathBuf,
    pub known_hosts: PathBuf,
    pub connect_timeout: Duration,
    /// Where the OpenSSH control socket lives (private to root).
    pub control_dir: PathBuf,
    /// The longest any one request may wait for an answer; keep-alives go out at a quarter
    /// of it, so ssh itself gives up on a dead link in about as long.
    pub stall_timeout: Duration,
    /// When set, no request waits past this moment (the run's `run_timeout`).
    pub deadline: Option<std::time::Instant>,
    /// For `s3://` servers.
    pub s3: S3Options,
}

/// Opens a connection to `url`.
pub fn connect(url: &ServerUrl, ssh: &SshOptions) -> Result<Box<dyn Connection>, RemoteError> {
    match url {
        ServerUrl::Dir(path) => Ok(Box::new(DirConnection::open(path)?)),
        ServerUrl::Sftp { user, host, port } => {
            Ok(Box::new(SftpConnection::connect(user, host, *port, ssh)?))
        }
        ServerUrl::S3(location) => Ok(Box::new(S3Connection::connect(location, ssh)?)),
        ServerUrl::Https(base) => Ok(Box::new(HttpsConnection::connect(base, ssh)?)),
    }
}

/// Why a connection is opened: the fetch of a run is bounded by `run_timeout`; the
/// confirmation after activation only by `stall_timeout` and `confirm_timeout`, so a long
/// build never makes it fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Fetch,
    Confirm,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_files_stay_inside_cache() {
        let nar = "nar/0vvpqikqcsdsqy4213xigwp664iis3w1lb6al7gakrb78m06n6vc.nar.zst";
        assert_eq!(
            Item::Cache(CacheFile::nar(nar).unwrap()).path(),
            format!("cache/{nar}")
        );
        let hash = "6jzajc5g4i93ykxd3s72fiqj5hvaxr18";
        assert_eq!(
            Item::Cache(CacheFile::narinfo(hash).unwrap()).path(),
            format!("cache/{hash}.narinfo")
        );
        assert_eq!(Item::Cache(CacheFile::Info).path(), "cache/nix-cache-info");
        for bad in [
            "nar/../0vvpqikqcsdsqy4213xigwp664iis3w1lb6al7gakrb78m06n6v.nar",
            "../nar/0vvpqikqcsdsqy4213xigwp664iis3w1lb6al7gakrb78m06n6vc.nar",
            "nar/0vvpqikqcsdsqy4213xigwp664iis3w1lb6al7gakrb78m06n6vc.nar.gz",
            "nar/0vvpqikqcsdsqy4213xigwp664iis3w1lb6al7gakrb78m06n6vc.nar/x",
            "nar/0vvpqikqcsdsqy4213xigwp664iis3w1lb6al7gakrb78m06n6ve.nar",
            "nar/x.nar",
        ] {
            assert!(CacheFile::nar(bad).is_none(), "{bad}");
        }
        for bad in [
            "../../../../../../etc/passwd",
            "6jzajc5g4i93ykxd3s72fiqj5hvaxr1",
            "6jzajc5g4i93ykxd3s72fiqj5hvaxr1/",
        ] {
            assert!(CacheFile::narinfo(bad).is_none(), "{bad}");
        }
    }

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
        assert_eq!(
            "https://mirror.example.org/bento/alpha/"
                .parse::<ServerUrl>()
                .unwrap(),
            ServerUrl::Https("https://mirror.example.org/bento/alpha".into())
        );
        assert_eq!(
            "http://127.0.0.1:8080/alpha".parse::<ServerUrl>().unwrap(),
            ServerUrl::Https("http://127.0.0.1:8080/alpha".into())
        );
        assert!("http://[::1]:8080/alpha".parse::<ServerUrl>().is_ok());
        assert!(!ServerUrl::Https("https://m/a".into()).takes_reports());
        for bad in [
            "http://mirror.example.org/alpha",
            "https://mirror.example.org/alpha?x=1",
            "https://user@mirror.example.org/alpha",
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
