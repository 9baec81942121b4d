//! `bento agent serve`: the "Update my machine" page, on loopback only. `GET /` shows this
//! machine's state, `POST /update` starts an update through the same locked code path as the
//! timer (`agent::update`), `GET /events` streams its progress as server-sent events and ends
//! with one `result` event, `GET /state` is the state as JSON.
//!
//! What it guarantees:
//! - it listens on a loopback address only (its own bind, or the socket systemd passes);
//! - every request must name this listener in `Host` (a DNS-rebinding page gets nothing);
//! - nothing changes on a GET; the one POST is refused (403) unless its `Origin` (or, without
//!   one, `Sec-Fetch-Site`) says it comes from the page itself, so a link or a form on some
//!   web page cannot start an update;
//! - one update at a time per process: a second press attaches to the running one, and the
//!   state directory's lock orders it with the timer's runs;
//! - requests, connections and reads are bounded (head 8 KiB, body 1 KiB, 32 connections,
//!   10 s per read or write).
//!
//! HTTP/1.1 by hand over std: one request per connection (`Connection: close`), which is all a
//! page with one button and one event stream needs, and no framework to keep up to date.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::config::AgentConfig;
use super::host::NixHost;
use super::state::{State, StateDir};
use super::{RunResult, UpdateOptions};
use crate::agent::source;
use crate::nix::Nix;
use crate::protocol::report::Outcome;

/// Where the page listens when systemd does not pass a socket.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:51337";

const PAGE: &str = include_str!("page.html");
/// Request line and headers together.
const MAX_HEAD: usize = 8 * 1024;
/// `POST /update` needs no body; a small form body is read and ignored.
const MAX_BODY: usize = 1024;
const MAX_CONNECTIONS: usize = 32;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// A comment line on an idle event stream, so a closed tab is noticed and proxies keep it open.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Progress lines kept per run (a run logs a dozen steps; this only bounds memory).
const MAX_RUN_LINES: usize = 2000;
/// How often the accept loop looks at the idle timer.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The first file descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("refusing to listen on {0}: the page listens on loopback only (127.0.0.1 or ::1)")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the socket passed by systemd: {0}")]
    Activation(String),
    #[error("waiting for connections: {0}")]
    Accept(std::io::Error),
}

/// How `serve` listens and when it stops.
pub struct ServeOptions<'a> {
    /// The agent's settings file, read on every page view and every update.
    pub config_path: PathBuf,
    /// Bound when systemd passes no socket. Must be a loopback address.
    pub listen: SocketAddr,
    /// Return after this long without a connection or a running update (systemd's socket
    /// starts the service again on the next visit). `None`: serve until killed.
    pub exit_when_idle: Option<Duration>,
    /// Called once with the page's URL when listening.
    pub on_listening: &'a dyn Fn(&str),
}

/// Runs one update and says how it ended; `progress` receives lines for the person watching.
pub trait Runner: Send + Sync + 'static {
    fn run(&self, progress: &dyn Fn(&str)) -> Finished;
}

/// How an update started from the page ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FinalOutcome {
    Updated,
    NothingToDo,
    Failed,
    RolledBack,
    /// The update could not run (configuration, state directory, server unreachable).
    Error,
}

impl FinalOutcome {
    fn good(self) -> bool {
        matches!(self, FinalOutcome::Updated | FinalOutcome::NothingToDo)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finished {
    pub outcome: FinalOutcome,
    /// One sentence for the page.
    pub message: String,
    /// The status `bento agent update` exits with for the same result (docs/agent.md).
    pub exit_code: u8,
    /// RFC 3339, UTC.
    pub finished: String,
}

impl Finished {
    pub fn new(outcome: FinalOutcome, message: String, exit_code: u8) -> Self {
        Self {
            outcome,
            message,
            exit_code,
            finished: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        }
    }
}

/// The real update: `agent::update` with this machine's Nix and server, exactly as
/// `bento agent update` runs it (same lock, same steps, same report).
pub struct AgentRunner {
    pub config_path: PathBuf,
}

impl Runner for AgentRunner {
    fn run(&self, progress: &dyn Fn(&str)) -> Finished {
        let cfg = match AgentConfig::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                return Finished::new(FinalOutcome::Error, format!("Could not update: {e}"), 1)
            }
        };
        progress(&format!("checking {} for a new version", cfg.server));
        let host = NixHost::new(Nix::default(), &cfg);
        let ssh = cfg.ssh_options();
        let connect = || source::connect(&cfg.server, &ssh);
        let on_wait =
            || progress("another update is running (the timer's or a terminal's); waiting for it");
        let result = super::update(&UpdateOptions {
            config: &cfg,
            host: &host,
            connect: &connect,
            now: &SystemTime::now,
            force: false,
            on_wait: &on_wait,
            on_progress: progress,
        });
        match result {
            Ok(r) => finished_from(r),
            Err(e) => Finished::new(
                FinalOutcome::Error,
                format!("Could not update: {}", error_chain(&e)),
                1,
            ),
        }
    }
}

/// The page's sentence for each result of a run.
fn finished_from(r: RunResult) -> Finished {
    let code = r.exit_code();
    let err = |e: &Option<String>| e.clone().unwrap_or_else(|| "no details".into());
    let (outcome, message) = match &r {
        RunResult::NoOp { reason } => (FinalOutcome::NothingToDo, format!("Nothing to do: {reason}.")),
        RunResult::Updated(rep) => (
            FinalOutcome::Updated,
            format!(
                "Updated to version {}{}.{}",
                rep.version.short(),
                match rep.kind {
                    crate::protocol::report::RunKind::Published => "",
                    crate::protocol::report::RunKind::AutoUpdated => " with newer flake inputs (self-update)",
                },
                if rep.reboot_required {
                    " Restart the machine to run its new kernel."
                } else {
                    ""
                }
            ),
        ),
        RunResult::Failed(rep) => (
            FinalOutcome::Failed,
            format!(
                "The update to version {} failed; this machine keeps what it ran before. {}",
                rep.version.short(),
                err(&rep.error)
            ),
        ),
        RunResult::RolledBack(rep) => (
            FinalOutcome::RolledBack,
            format!(
                "Version {} was activated but the server was unreachable afterwards, so this machine went back to its previous system. {}",
                rep.version.short(),
                err(&rep.error)
            ),
        ),
    };
    Finished::new(outcome, message, code)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

// ---------------------------------------------------------------------------------------
// Runs: the one update this process runs, and what it printed.

#[derive(Debug)]
struct Run {
    id: u64,
    started: SystemTime,
    lines: Vec<String>,
    finished: Option<Finished>,
}

#[derive(Debug, Default)]
struct Runs {
    next_id: u64,
    /// The latest run (running or finished); earlier ones are forgotten.
    latest: Option<Run>,
}

impl Runs {
    fn running(&self) -> Option<u64> {
        self.latest
            .as_ref()
            .filter(|r| r.finished.is_none())
            .map(|r| r.id)
    }
}

struct Shared {
    runs: Mutex<Runs>,
    changed: Condvar,
    runner: Arc<dyn Runner>,
    config_path: PathBuf,
    /// `Host` header values that name this listener.
    hosts: Vec<String>,
    connections: AtomicUsize,
    last_activity: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves data that is still consistent here (a list of
    // lines and an Option), so a poisoned lock is used as is.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Starts an update, or returns the one already running: `(run id, started now)`.
    fn start_or_attach(self: &Arc<Self>) -> (u64, bool) {
        let mut runs = lock(&self.runs);
        if let Some(id) = runs.running() {
            return (id, false);
        }
        runs.next_id += 1;
        let id = runs.next_id;
        runs.latest = Some(Run {
            id,
            started: SystemTime::now(),
            lines: Vec::new(),
            finished: None,
        });
        let shared = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("bento-update".into())
            .spawn(move || shared.run_update(id));
        if let Err(e) = spawned {
            if let Some(run) = runs.latest.as_mut() {
                run.finished = Some(Finished::new(
                    FinalOutcome::Error,
                    format!("Could not start the update: {e}"),
                    1,
                ));
            }
        }
        self.changed.notify_all();
        (id, true)
    }

    fn run_update(&self, id: u64) {
        let progress = |line: &str| {
            let mut runs = lock(&self.runs);
            if let Some(run) = runs.latest.as_mut().filter(|r| r.id == id) {
                if run.lines.len() < MAX_RUN_LINES {
                    run.lines.push(line.to_owned());
                }
            }
            self.changed.notify_all();
        };
        let finished =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.runner.run(&progress)))
                .unwrap_or_else(|_| {
                    Finished::new(
                        FinalOutcome::Error,
                        "The update stopped unexpectedly (a bug in bento); see the journal.".into(),
                        1,
                    )
                });
        tracing::info!("update from the page: {}", finished.message);
        let mut runs = lock(&self.runs);
        if let Some(run) = runs.latest.as_mut().filter(|r| r.id == id) {
            run.finished = Some(finished);
        }
        *lock(&self.last_activity) = Instant::now();
        self.changed.notify_all();
    }
}

// ---------------------------------------------------------------------------------------
// Listening.

/// How many sockets systemd passed to this process, from `LISTEN_PID` and `LISTEN_FDS`.
/// `None` when none were passed or they were meant for another process.
fn activation_count(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    our_pid: u32,
) -> Result<Option<u32>, String> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(our_pid) {
        return Ok(None);
    }
    match fds.trim().parse::<u32>() {
        Ok(0) => Ok(None),
        Ok(1) => Ok(Some(1)),
        Ok(n) => Err(format!(
            "systemd passed {n} sockets; the page's .socket unit must have exactly one ListenStream"
        )),
        Err(_) => Err(format!("LISTEN_FDS={fds:?} is not a number")),
    }
}

/// The listening socket systemd passed as fd 3, if it passed one to this process.
fn activated_listener() -> Result<Option<TcpListener>, ServeError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    // Children (nix, ssh, switch-to-configuration) must not think the socket is theirs.
    // Called before any thread exists.
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let Some(_) = activation_count(pid.as_deref(), fds.as_deref(), std::process::id())
        .map_err(ServeError::Activation)?
    else {
        return Ok(None);
    };
    let fd = LISTEN_FDS_START;
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `kind`, which lives for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || kind != libc::SOCK_STREAM {
        return Err(ServeError::Activation(format!(
            "fd {fd} is not a stream socket (the .socket unit needs ListenStream=)"
        )));
    }
    // SAFETY: fcntl on a descriptor we were handed; only sets close-on-exec.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: systemd passed fd 3 to this very process (LISTEN_PID matched) and nothing
    // else in it owns the descriptor.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    listener
        .local_addr()
        .map_err(|e| ServeError::Activation(format!("fd {fd} is not a TCP socket: {e}")))?;
    Ok(Some(listener))
}

/// `Host` values a browser sends for this listener.
fn allowed_hosts(local: SocketAddr) -> Vec<String> {
    let port = local.port();
    let ip = match local.ip() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let mut hosts = vec![format!("{ip}:{port}"), format!("localhost:{port}")];
    if port == 80 {
        hosts.push(ip);
        hosts.push("localhost".into());
    }
    hosts
}

fn wait_readable(listener: &TcpListener, timeout: Duration) -> bool {
    let mut fds = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd that outlives the call.
    unsafe { libc::poll(&mut fds, 1, ms) > 0 }
}

/// Serves the page until `exit_when_idle` passes with nothing to do (or forever).
pub fn serve(opts: &ServeOptions<'_>, runner: Arc<dyn Runner>) -> Result<(), ServeError> {
    let listener = match activated_listener()? {
        Some(l) => l,
        None => {
            if !opts.listen.ip().is_loopback() {
                return Err(ServeError::NotLoopback(opts.listen));
            }
            TcpListener::bind(opts.listen).map_err(|source| ServeError::Bind {
                addr: opts.listen,
                source,
            })?
        }
    };
    let local = listener.local_addr().map_err(ServeError::Accept)?;
    if !local.ip().is_loopback() {
        return Err(ServeError::NotLoopback(local));
    }
    listener.set_nonblocking(true).map_err(ServeError::Accept)?;
    let hosts = allowed_hosts(local);
    let shared = Arc::new(Shared {
        runs: Mutex::new(Runs::default()),
        changed: Condvar::new(),
        runner,
        config_path: opts.config_path.clone(),
        hosts: hosts.clone(),
        connections: AtomicUsize::new(0),
        last_activity: Mutex::new(Instant::now()),
    });
    tracing::info!("serving the update page on http://{}/", hosts[0]);
    (opts.on_listening)(&format!("http://{}/", hosts[0]));
    loop {
        if wait_readable(&listener, POLL_INTERVAL) {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => dispatch(&shared, stream),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Out of descriptors or memory: wait a little rather than spin.
                        tracing::warn!("accepting a connection: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
        if let Some(idle) = opts.exit_when_idle {
            let quiet = shared.connections.load(Ordering::SeqCst) == 0
                && lock(&shared.runs).running().is_none();
            if quiet && lock(&shared.last_activity).elapsed() >= idle {
                tracing::info!(
                    "no visitor for {}; exiting",
                    humantime::format_duration(idle)
                );
                return Ok(());
            }
        }
    }
}

/// Decrements the connection count and marks activity when a connection ends.
struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
        *lock(&self.0.last_activity) = Instant::now();
    }
}

fn dispatch(shared: &Arc<Shared>, mut stream: TcpStream) {
    *lock(&shared.last_activity) = Instant::now();
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        shared.connections.fetch_sub(1, Ordering::SeqCst);
        let _ = respond(
            &mut stream,
            503,
            "text/plain",
            &[],
            b"too many connections\n",
        );
        return;
    }
    let guard = ConnectionGuard(Arc::clone(shared));
    let spawned = std::thread::Builder::new()
        .name("bento-page".into())
        .spawn(move || {
            handle(&guard.0, stream);
            drop(guard);
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a thread for a connection: {e}");
    }
}

// ---------------------------------------------------------------------------------------
// HTTP.

#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
    /// Lower-case names, in order.
    headers: Vec<(String, String)>,
    content_length: usize,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP error answer: status and a short text.
type Refusal = (u16, &'static str);

/// Parses a request head (everything before the blank line).
fn parse_head(head: &[u8]) -> Result<Request, Refusal> {
    let text = std::str::from_utf8(head).map_err(|_| (400, "request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err((505, "HTTP/1.x only"));
    }
    if !target.starts_with('/') {
        return Err((400, "request target must be a path"));
    }
    let path = target.split(['?', '#']).next().unwrap_or("/").to_owned();
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line.split_once(':').ok_or((400, "malformed header"))?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return Err((400, "malformed header name"));
        }
        let name = name.to_ascii_lowercase();
        // Two Hosts or two Origins could make the checks below read another value than
        // the one a proxy or browser meant.
        if ["host", "origin", "content-length", "sec-fetch-site"].contains(&name.as_str())
            && headers.iter().any(|(n, _)| *n == name)
        {
            return Err((400, "repeated header"));
        }
        headers.push((name, value.trim().to_owned()));
    }
    let mut req = Request {
        method: method.to_owned(),
        path,
        headers,
        content_length: 0,
    };
    if req.header("transfer-encoding").is_some() {
        return Err((411, "send a Content-Length, not a chunked body"));
    }
    if let Some(len) = req.header("content-length") {
        let len: usize = len.parse().map_err(|_| (400, "bad Content-Length"))?;
        if len > MAX_BODY {
            return Err((413, "request body too large"));
        }
        req.content_length = len;
    }
    Ok(req)
}

/// Reads one request (head and body, both bounded) from the connection.
fn read_request(stream: &mut impl Read) -> Result<Request, Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err((431, "request head too large"));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err((400, "connection closed mid-request")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err((408, "request timed out")),
        }
    };
    if end > MAX_HEAD {
        return Err((431, "request head too large"));
    }
    let req = parse_head(&buf[..end])?;
    // The body is read (so the client sees our answer, not a reset) and ignored.
    let mut have = buf.len() - (end + 4);
    while have < req.content_length {
        match stream.read(&mut chunk) {
            Ok(0) => return Err((400, "connection closed mid-body")),
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err((408, "request timed out")),
        }
    }
    Ok(req)
}

/// A state-changing request must come from the page itself. Browsers send `Origin` on every
/// POST (and `Sec-Fetch-Site`); a form or script on another site carries that site's origin.
fn check_same_origin(req: &Request, host: &str) -> Result<(), &'static str> {
    let site = req.header("sec-fetch-site");
    let origin = req.header("origin");
    if origin.is_some_and(|o| !o.eq_ignore_ascii_case(&format!("http://{host}"))) {
        return Err(
            "refused: cross-origin request (only the update page itself may start an update)",
        );
    }
    if site.is_some_and(|s| !s.eq_ignore_ascii_case("same-origin")) {
        return Err("refused: this request did not come from the update page (Sec-Fetch-Site)");
    }
    if origin.is_none() && site.is_none() {
        return Err("refused: no Origin header (only the update page itself may start an update)");
    }
    Ok(())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        303 => "See Other",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

fn respond(
    stream: &mut impl Write,
    status: u16,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\n",
        reason(status),
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

fn respond_text(stream: &mut impl Write, status: u16, text: &str) -> std::io::Result<()> {
    respond(
        stream,
        status,
        "text/plain; charset=utf-8",
        &[],
        format!("{text}\n").as_bytes(),
    )
}

fn handle(shared: &Arc<Shared>, mut stream: TcpStream) {
    let req = match read_request(&mut stream) {
        Ok(r) => r,
        Err((status, text)) => {
            let _ = respond_text(&mut stream, status, text);
            return;
        }
    };
    let host = match req.header("host") {
        Some(h) if shared.hosts.iter().any(|a| a.eq_ignore_ascii_case(h)) => h.to_owned(),
        _ => {
            let text = format!("this page answers only as http://{}/", shared.hosts[0]);
            let _ = respond_text(&mut stream, 421, &text);
            return;
        }
    };
    let result = match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/") => {
            let html = render_page(&page_state(shared), &lock(&shared.runs));
            respond(
                &mut stream,
                200,
                "text/html; charset=utf-8",
                &[("Content-Security-Policy", content_security_policy())],
                html.as_bytes(),
            )
        }
        ("GET", "/state") => {
            let body = serde_json::to_vec(&page_state(shared)).expect("state serialises");
            respond(&mut stream, 200, "application/json", &[], &body)
        }
        ("GET", "/events") => {
            stream_events(shared, &mut stream, req.header("last-event-id"));
            Ok(())
        }
        ("POST", "/update") => match check_same_origin(&req, &host) {
            Err(text) => {
                tracing::warn!(
                    "refused POST /update from origin {:?}",
                    req.header("origin").unwrap_or("-")
                );
                respond_text(&mut stream, 403, text)
            }
            Ok(()) => {
                let (run, started) = shared.start_or_attach();
                let wants_json = req
                    .header("accept")
                    .is_some_and(|a| a.contains("application/json"));
                if wants_json {
                    let body = serde_json::json!({ "run": run, "started": started }).to_string();
                    respond(&mut stream, 202, "application/json", &[], body.as_bytes())
                } else {
                    // A plain form post (no JavaScript): back to the page, which shows the run.
                    respond(&mut stream, 303, "text/plain", &[("Location", "/")], b"")
                }
            }
        },
        (_, "/" | "/state" | "/events") => respond(
            &mut stream,
            405,
            "text/plain",
            &[("Allow", "GET")],
            b"use GET\n",
        ),
        (_, "/update") => respond(
            &mut stream,
            405,
            "text/plain",
            &[("Allow", "POST")],
            b"an update starts only with POST, from the page\n",
        ),
        _ => respond_text(&mut stream, 404, "not found"),
    };
    if let Err(e) = result {
        tracing::debug!("answering {} {}: {e}", req.method, req.path);
    }
}

// ---------------------------------------------------------------------------------------
// Server-sent events.

/// Where a stream is: which run, and the next line to send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Cursor {
    run: Option<u64>,
    next: usize,
}

/// `Last-Event-ID` as sent back by a reconnecting EventSource: `<run>-start`, `<run>-<line>`
/// or `<run>-end`.
fn parse_event_id(id: &str) -> Cursor {
    let Some((run, pos)) = id.split_once('-') else {
        return Cursor::default();
    };
    let Ok(run) = run.parse() else {
        return Cursor::default();
    };
    let next = match pos {
        "start" => 0,
        "end" => usize::MAX,
        n => match n.parse::<usize>() {
            Ok(i) => i + 1,
            Err(_) => return Cursor::default(),
        },
    };
    Cursor {
        run: Some(run),
        next,
    }
}

fn sse(event: Option<&str>, id: &str, data: &str) -> String {
    let mut out = String::new();
    if let Some(e) = event {
        out.push_str(&format!("event: {e}\n"));
    }
    out.push_str(&format!("id: {id}\n"));
    for line in data.split('\n') {
        out.push_str(&format!("data: {}\n", line.trim_end_matches('\r')));
    }
    out.push('\n');
    out
}

/// The events a stream at `cursor` has not sent yet, and whether the stream is complete.
fn next_events(runs: &Runs, cursor: &mut Cursor) -> (Vec<String>, bool) {
    let Some(run) = &runs.latest else {
        return (vec![sse(Some("idle"), "idle", "{}")], true);
    };
    let mut out = Vec::new();
    if cursor.run != Some(run.id) {
        *cursor = Cursor {
            run: Some(run.id),
            next: 0,
        };
        let started = humantime::format_rfc3339_seconds(run.started).to_string();
        let data = serde_json::json!({ "run": run.id, "started": started }).to_string();
        out.push(sse(Some("run"), &format!("{}-start", run.id), &data));
    }
    for (i, line) in run.lines.iter().enumerate().skip(cursor.next) {
        out.push(sse(None, &format!("{}-{i}", run.id), line));
    }
    cursor.next = cursor.next.max(run.lines.len());
    if let Some(f) = &run.finished {
        let data = serde_json::to_string(f).expect("result serialises");
        out.push(sse(Some("result"), &format!("{}-end", run.id), &data));
        return (out, true);
    }
    (out, false)
}

/// Streams the latest run: its start, every line so far and to come, then the result.
/// Without any run in this process, one `idle` event.
fn stream_events(shared: &Shared, stream: &mut TcpStream, last_event_id: Option<&str>) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-store\r\nConnection: close\r\nX-Content-Type-Options: nosniff\r\n\r\n";
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let mut cursor = last_event_id.map(parse_event_id).unwrap_or_default();
    loop {
        let (events, done) = {
            let mut runs = lock(&shared.runs);
            let mut waited = false;
            loop {
                let (events, done) = next_events(&runs, &mut cursor);
                if !events.is_empty() || done {
                    break (events, done);
                }
                if waited {
                    break (vec![": keep-alive\n\n".to_owned()], false);
                }
                runs = shared
                    .changed
                    .wait_timeout(runs, KEEPALIVE)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                waited = true;
            }
        };
        for e in &events {
            if stream.write_all(e.as_bytes()).is_err() {
                return;
            }
        }
        if stream.flush().is_err() || done {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The page.

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Row {
    key: &'static str,
    label: &'static str,
    value: String,
    /// `ok`, `bad`, `warn` or empty: how the page colours the value.
    class: &'static str,
}

#[derive(Debug, Clone, Serialize)]
struct PageState {
    host: Option<String>,
    rows: Vec<Row>,
    /// The update running now, if any.
    running: Option<u64>,
    reboot_pending: bool,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// `2026-11-25 12:15 UTC (3 minutes ago)`.
fn when(secs: u64, now: u64) -> String {
    let t = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string();
    let stamp = format!("{} {} UTC", &t[..10], &t[11..16]);
    let ago = now.saturating_sub(secs);
    let rel = match ago {
        0..=59 => "just now".to_owned(),
        60..=119 => "1 minute ago".to_owned(),
        120..=3599 => format!("{} minutes ago", ago / 60),
        3600..=7199 => "1 hour ago".to_owned(),
        7200..=86399 => format!("{} hours ago", ago / 3600),
        86400..=172799 => "1 day ago".to_owned(),
        _ => format!("{} days ago", ago / 86400),
    };
    format!("{stamp} ({rel})")
}

/// `/nix/store/<hash>-nixos-system-alpha-24.05` → `nixos-system-alpha-24.05`.
fn system_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name,
        _ => base,
    }
}

/// The rows of the state table, from the agent's settings and state file.
fn state_rows(
    cfg: Result<&AgentConfig, String>,
    state: Result<&State, String>,
    now: u64,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let row = |key, label, value: String, class| Row {
        key,
        label,
        value,
        class,
    };
    match &cfg {
        Ok(cfg) => rows.push(row("host", "Machine", cfg.host.to_string(), "")),
        Err(e) => rows.push(row("host", "Machine", format!("unknown: {e}"), "bad")),
    }
    match state {
        Err(e) => rows.push(row(
            "applied",
            "Version applied",
            format!("unknown: {e}"),
            "bad",
        )),
        Ok(state) => {
            rows.push(match &state.applied {
                Some(a) => row(
                    "applied",
                    "Version applied",
                    format!(
                        "{} ({}), {}",
                        a.version.short(),
                        system_name(a.system.as_str()),
                        when(a.at, now)
                    ),
                    "",
                ),
                None => row("applied", "Version applied", "nothing yet".into(), ""),
            });
            rows.push(match &state.last {
                Some(l) => {
                    let (text, class) = match l.outcome {
                        Outcome::Success => ("succeeded", "ok"),
                        Outcome::Failure => ("failed", "bad"),
                        Outcome::Rollback => ("rolled back", "bad"),
                    };
                    let err = l
                        .error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default();
                    row(
                        "last",
                        "Last update",
                        format!(
                            "{text}, version {}, {}{err}",
                            l.version.short(),
                            when(l.finished, now)
                        ),
                        class,
                    )
                }
                None => row("last", "Last update", "none yet".into(), ""),
            });
            rows.push(if state.reboot_pending {
                row(
                    "reboot",
                    "Reboot pending",
                    "yes: the new kernel runs after the next restart".into(),
                    "warn",
                )
            } else {
                row("reboot", "Reboot pending", "no".into(), "")
            });
        }
    }
    if let Ok(cfg) = cfg {
        rows.push(row("server", "Server", cfg.server.to_string(), ""));
    }
    rows.push(row(
        "agent",
        "Agent",
        format!("bento {}", env!("CARGO_PKG_VERSION")),
        "",
    ));
    rows
}

fn page_state(shared: &Shared) -> PageState {
    let cfg = AgentConfig::load(&shared.config_path).map_err(|e| e.to_string());
    let state = match &cfg {
        Ok(c) => {
            let dir = StateDir::new(&c.state_dir);
            dir.load()
                .map_err(|e| format!("{}: {e}", dir.state_file().display()))
        }
        Err(_) => Err("the agent's settings cannot be read".into()),
    };
    let rows = state_rows(
        cfg.as_ref().map_err(Clone::clone),
        state.as_ref().map_err(Clone::clone),
        now_secs(),
    );
    PageState {
        host: cfg.as_ref().ok().map(|c| c.host.to_string()),
        rows,
        running: lock(&shared.runs).running(),
        reboot_pending: state.as_ref().is_ok_and(|s| s.reboot_pending),
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page with the state, and the latest run for a browser without JavaScript.
fn render_page(state: &PageState, runs: &Runs) -> String {
    let rows: String = state
        .rows
        .iter()
        .map(|r| {
            format!(
                "<tr><th>{}</th><td data-key=\"{}\" class=\"{}\">{}</td></tr>",
                escape(r.label),
                r.key,
                r.class,
                escape(&r.value)
            )
        })
        .collect();
    let (lines, result, result_class) = match &runs.latest {
        Some(run) => (
            run.lines
                .iter()
                .map(|l| format!("<li>{}</li>", escape(l)))
                .collect::<String>(),
            run.finished
                .as_ref()
                .map_or(String::new(), |f| escape(&f.message)),
            match &run.finished {
                Some(f) if f.outcome.good() => "ok",
                Some(_) => "bad",
                None => "",
            },
        ),
        None => (String::new(), String::new(), ""),
    };
    let running = runs.running().is_some();
    let host = escape(state.host.as_deref().unwrap_or("this machine"));
    PAGE.replace("{{HOST}}", &host)
        .replace("{{ROWS}}", &rows)
        .replace("{{RUNNING}}", if running { "true" } else { "false" })
        .replace(
            "{{REFRESH}}",
            if running {
                "<noscript><meta http-equiv=\"refresh\" content=\"5\"></noscript>"
            } else {
                ""
            },
        )
        .replace(
            "{{PROGRESS_HIDDEN}}",
            if runs.latest.is_some() { "" } else { "hidden" },
        )
        .replace("{{LINES}}", &lines)
        .replace("{{RESULT}}", &result)
        .replace("{{RESULT_CLASS}}", result_class)
        .replace("{{VERSION}}", env!("CARGO_PKG_VERSION"))
}

/// The text between the first `<tag>` and `</tag>` of the page.
fn inline_block<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = page.find(&open).map(|i| i + open.len()).unwrap_or(0);
    let end = page[start..].find(&close).map_or(start, |i| start + i);
    &page[start..end]
}

/// Only the page's own inline script and style run (by hash), it talks only to itself, and no
/// other site may frame it.
fn content_security_policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        use sha2::Digest as _;
        let hash = |text: &str| base64(&sha2::Sha256::digest(text.as_bytes()));
        format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            hash(inline_block(PAGE, "script")),
            hash(inline_block(PAGE, "style"))
        )
    })
}

/// Standard base64 with padding (for CSP hashes; server::keys tests use it too).
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::manifest::Digest;

    fn req(head: &str) -> Result<Request, Refusal> {
        parse_head(head.as_bytes())
    }

    #[test]
    fn parses_a_request_head() {
        let r = req("POST /update?x=1 HTTP/1.1\r\nHost: 127.0.0.1:51337\r\nOrigin: http://127.0.0.1:51337\r\nContent-Length: 0").unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/update");
        assert_eq!(r.header("host"), Some("127.0.0.1:51337"));
        assert_eq!(r.header("origin"), Some("http://127.0.0.1:51337"));
        assert_eq!(r.content_length, 0);
    }

    #[test]
    fn refuses_malformed_and_oversized_requests() {
        for (head, status) in [
            ("GET / HTTP/2", 505),
            ("GET /", 400),
            ("GET http://evil/ HTTP/1.1", 400),
            ("POST /update HTTP/1.1\r\nContent-Length: 4096", 413),
            ("POST /update HTTP/1.1\r\nTransfer-Encoding: chunked", 411),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b", 400),
            ("GET / HTTP/1.1\r\nno colon", 400),
        ] {
            assert_eq!(req(head).unwrap_err().0, status, "{head}");
        }
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(
            read_request(&mut huge.as_bytes()).unwrap_err().0,
            431,
            "head over 8 KiB"
        );
        let ok = "POST /update HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\na=b";
        assert_eq!(read_request(&mut ok.as_bytes()).unwrap().path, "/update");
        let cut = "POST /update HTTP/1.1\r\nContent-Length: 30\r\n\r\na=b";
        assert_eq!(read_request(&mut cut.as_bytes()).unwrap_err().0, 400);
    }

    #[test]
    fn only_the_page_itself_may_post() {
        let host = "127.0.0.1:51337";
        let post = |headers: &str| {
            req(&format!(
                "POST /update HTTP/1.1\r\nHost: {host}\r\n{headers}"
            ))
            .unwrap()
        };
        for ok in [
            "Origin: http://127.0.0.1:51337",
            "Origin: http://127.0.0.1:51337\r\nSec-Fetch-Site: same-origin",
            "Sec-Fetch-Site: same-origin",
        ] {
            assert_eq!(check_same_origin(&post(ok), host), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "Origin: http://evil.example",
            "Origin: null",
            "Origin: https://127.0.0.1:51337",
            "Origin: http://127.0.0.1:51338",
            "Origin: http://127.0.0.1:51337\r\nSec-Fetch-Site: cross-site",
            "Sec-Fetch-Site: same-site",
            "Sec-Fetch-Site: none",
        ] {
            assert!(check_same_origin(&post(bad), host).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_names_for_a_listener() {
        let v4 = allowed_hosts("127.0.0.1:51337".parse().unwrap());
        assert_eq!(v4, ["127.0.0.1:51337", "localhost:51337"]);
        let v6 = allowed_hosts("[::1]:8080".parse().unwrap());
        assert_eq!(v6, ["[::1]:8080", "localhost:8080"]);
        assert!(allowed_hosts("127.0.0.1:80".parse().unwrap()).contains(&"127.0.0.1".into()));
    }

    #[test]
    fn socket_activation_variables() {
        assert_eq!(activation_count(None, None, 7), Ok(None));
        assert_eq!(activation_count(Some("7"), Some("1"), 7), Ok(Some(1)));
        assert_eq!(
            activation_count(Some("8"), Some("1"), 7),
            Ok(None),
            "another process's"
        );
        assert_eq!(activation_count(Some("7"), Some("0"), 7), Ok(None));
        assert!(activation_count(Some("7"), Some("2"), 7)
            .unwrap_err()
            .contains("2 sockets"));
        assert!(activation_count(Some("7"), Some("x"), 7).is_err());
    }

    #[test]
    fn refuses_to_listen_beyond_loopback() {
        let opts = ServeOptions {
            config_path: "/nonexistent".into(),
            listen: "0.0.0.0:0".parse().unwrap(),
            exit_when_idle: Some(Duration::ZERO),
            on_listening: &|_| {},
        };
        struct Never;
        impl Runner for Never {
            fn run(&self, _: &dyn Fn(&str)) -> Finished {
                unreachable!()
            }
        }
        let err = serve(&opts, Arc::new(Never)).unwrap_err();
        assert!(matches!(err, ServeError::NotLoopback(_)), "{err}");
        assert!(err.to_string().contains("loopback"), "{err}");
    }

    #[test]
    fn events_stream_a_run_then_its_result() {
        let mut runs = Runs::default();
        let mut cursor = Cursor::default();
        let (ev, done) = next_events(&runs, &mut cursor);
        assert!(done && ev[0].starts_with("event: idle\n"), "{ev:?}");

        runs.latest = Some(Run {
            id: 3,
            started: UNIX_EPOCH,
            lines: vec!["applying version abc".into()],
            finished: None,
        });
        let mut cursor = Cursor::default();
        let (ev, done) = next_events(&runs, &mut cursor);
        assert!(!done);
        assert_eq!(ev.len(), 2);
        assert!(
            ev[0].starts_with("event: run\nid: 3-start\ndata: {"),
            "{}",
            ev[0]
        );
        assert_eq!(ev[1], "id: 3-0\ndata: applying version abc\n\n");
        assert!(next_events(&runs, &mut cursor).0.is_empty(), "nothing new");

        let run = runs.latest.as_mut().unwrap();
        run.lines.push("two\nlines".into());
        run.finished = Some(Finished::new(FinalOutcome::Updated, "Updated.".into(), 10));
        let (ev, done) = next_events(&runs, &mut cursor);
        assert!(done);
        assert_eq!(ev[0], "id: 3-1\ndata: two\ndata: lines\n\n");
        assert!(
            ev[1].starts_with("event: result\nid: 3-end\ndata: {\"outcome\":\"updated\""),
            "{}",
            ev[1]
        );

        // A reconnecting EventSource resumes after the last line it saw.
        let mut resumed = parse_event_id("3-0");
        let (ev, _) = next_events(&runs, &mut resumed);
        assert_eq!(ev.len(), 2, "{ev:?}");
        // An id from an older run starts the newest run from its beginning.
        let mut old = parse_event_id("2-5");
        assert_eq!(next_events(&runs, &mut old).0.len(), 4);
        assert_eq!(parse_event_id("junk"), Cursor::default());
    }

    #[test]
    fn base64_matches_the_standard() {
        for (input, out) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("hello", "aGVsbG8="),
        ] {
            assert_eq!(base64(input.as_bytes()), out);
        }
    }

    #[test]
    fn the_policy_hashes_the_inline_script_and_style() {
        let csp = content_security_policy();
        assert!(csp.contains("script-src 'sha256-"), "{csp}");
        assert!(inline_block(PAGE, "script").contains("EventSource"));
        assert!(inline_block(PAGE, "style").contains("button"));
        for block in ["script", "style"] {
            assert!(
                !inline_block(PAGE, block).contains("{{"),
                "no placeholder inside <{block}>: its hash must not change"
            );
        }
    }

    #[test]
    fn the_page_shows_the_state_escaped() {
        let cfg = AgentConfig::parse(
            "host = \"alpha\"\nserver = \"sftp://bento-alpha@bento.example.org\"\n",
            std::path::Path::new("agent.toml"),
        )
        .unwrap();
        let now = 1_800_000_000;
        let v = Digest::of(b"v1");
        // From JSON, as the agent writes it (fields added later take their defaults).
        let state: State = serde_json::from_value(serde_json::json!({
            "applied": {
                "version": v,
                "system": "/nix/store/6x2qmbmbawhx4s6w4wyr8j9lmzz3q5fh-nixos-system-alpha-1",
                "at": now - 300,
            },
            "last": {
                "id": "x",
                "version": v,
                "outcome": "failure",
                "finished": now - 7200,
                "error": "build <failed> & stopped",
            },
            "failures": null,
            "reboot_pending": true,
        }))
        .unwrap();
        let rows = state_rows(Ok(&cfg), Ok(&state), now);
        let value = |k: &str| rows.iter().find(|r| r.key == k).unwrap().value.clone();
        assert_eq!(value("host"), "alpha");
        assert!(value("applied").contains(&v.short()), "{rows:?}");
        assert!(
            value("applied").contains("(nixos-system-alpha-1)"),
            "{rows:?}"
        );
        assert!(value("applied").contains("5 minutes ago"), "{rows:?}");
        assert!(value("last").starts_with("failed, version"), "{rows:?}");
        assert!(value("last").contains("2 hours ago"), "{rows:?}");
        assert!(value("reboot").starts_with("yes"));
        let page = PageState {
            host: Some("alpha".into()),
            rows,
            running: None,
            reboot_pending: true,
        };
        let html = render_page(&page, &Runs::default());
        assert!(
            html.contains("build &lt;failed&gt; &amp; stopped"),
            "escaped"
        );
        assert!(!html.contains("<failed>"));
        assert!(!html.contains("{{"), "every placeholder filled");
        assert!(html.contains("data-running=\"false\""));

        let rows = state_rows(Err("no such file".into()), Err("no state".into()), now);
        assert!(rows[0].value.contains("no such file") && rows[0].class == "bad");
    }

    #[test]
    fn a_second_press_attaches_to_the_running_update() {
        struct Slow(Mutex<u32>, Mutex<std::sync::mpsc::Receiver<()>>);
        impl Runner for Slow {
            fn run(&self, progress: &dyn Fn(&str)) -> Finished {
                *lock(&self.0) += 1;
                progress("working");
                let _ = lock(&self.1).recv_timeout(Duration::from_secs(10));
                Finished::new(FinalOutcome::NothingToDo, "done".into(), 0)
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let runner = Arc::new(Slow(Mutex::new(0), Mutex::new(rx)));
        let shared = Arc::new(Shared {
            runs: Mutex::new(Runs::default()),
            changed: Condvar::new(),
            runner: runner.clone(),
            config_path: "/nonexistent".into(),
            hosts: vec!["127.0.0.1:1".into()],
            connections: AtomicUsize::new(0),
            last_activity: Mutex::new(Instant::now()),
        });
        let (first, started) = shared.start_or_attach();
        assert!(started);
        let (second, started) = shared.start_or_attach();
        assert_eq!((second, started), (first, false), "attached");
        tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&shared.runs).running().is_some() {
            assert!(Instant::now() < deadline, "the run ends");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(*lock(&runner.0), 1, "one update ran");
        let runs = lock(&shared.runs);
        let run = runs.latest.as_ref().unwrap();
        assert_eq!(run.lines, ["working"]);
        assert_eq!(run.finished.as_ref().unwrap().message, "done");
        drop(runs);
        let (third, started) = shared.start_or_attach();
        assert!(
            started && third > first,
            "a press after the end starts a new run"
        );
        tx.send(()).unwrap();
    }
}
