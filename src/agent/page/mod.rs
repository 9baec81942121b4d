//! `bento agent serve`: the "Update my machine" page, on loopback only. `GET /` shows this
//! machine's state, `POST /update` starts an update through the same locked code path as the
//! timer (`agent::update`; with `retry=1`, as `--force`), `GET /events` streams its progress
//! as server-sent events and ends with one `result` event, `GET /state` is the state as JSON.
//!
//! What it guarantees:
//! - it listens on a loopback address only (its own bind, or the socket systemd passes);
//! - every request must name this listener in `Host` (a DNS-rebinding page gets nothing);
//! - nothing changes on a GET; the one POST is refused (403) unless its `Origin` (or, without
//!   one, `Sec-Fetch-Site`) says it comes from the page itself, so a link or a form on some
//!   web page cannot start an update;
//! - one update at a time per process: a second press attaches to the running one, and the
//!   state directory's lock orders it with the timer's runs;
//! - requests, connections and writes are bounded (head 8 KiB, body 1 KiB, 32 requests,
//!   5 s from accept to the end of the request, 10 s per blocked write), and event streams
//!   apart from them (16 streams of at most 30 s each: `slots`), so streams can never keep
//!   the page or its buttons from answering.
//!
//! The HTTP is hyper 1.x (`http1` server only) on the tokio already in the tree, rather than
//! axum: four routes need no router, every check here is one we must write ourselves anyway,
//! and axum would add tower and its layers for nothing. `listenfd` takes systemd's socket,
//! askama renders the HTML with escaping by default. No `unsafe` here.
//!
//! Files: `listen` (where), `http` (one connection and its checks), `slots` (how many of
//! each kind), `runs` (the update and the `Runner` seam), `events` (the event stream), `view`
//! (state, Retry, HTML, CSP).

#![forbid(unsafe_code)]

mod events;
mod http;
mod listen;
mod runs;
mod slots;
mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use runs::{AgentRunner, FinalOutcome, Finished, Runner, Trigger};

use runs::{lock, Shared};

/// Where the page listens when systemd does not pass a socket.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:51337";

/// How often the accept loop looks at the idle timer.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

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

/// Serves the page until `exit_when_idle` passes with nothing to do (or forever).
pub fn serve(opts: &ServeOptions<'_>, runner: Arc<dyn Runner>) -> Result<(), ServeError> {
    // Before the runtime starts any thread: this clears the activation variables.
    let listener = listen::listener(opts.listen)?;
    listener.set_nonblocking(true).map_err(ServeError::Accept)?;
    let local = listener.local_addr().map_err(ServeError::Accept)?;
    let hosts = listen::allowed_hosts(local);
    let url = format!("http://{}/", hosts[0]);
    let shared = Arc::new(Shared::new(runner, opts.config_path.clone(), hosts));
    // One thread is plenty for a page a person looks at; updates run on their own thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Accept)?;
    tracing::info!("serving the update page on {url}");
    (opts.on_listening)(&url);
    rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(ServeError::Accept)?;
        accept_loop(listener, shared, opts.exit_when_idle).await;
        Ok(())
    })
}

/// Marks activity when a connection's task ends, however it ends.
struct Touch(Arc<Shared>);

impl Drop for Touch {
    fn drop(&mut self) {
        self.0.touch();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    exit_when_idle: Option<Duration>,
) {
    let slots = Arc::new(slots::Slots::default());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    shared.touch();
                    let shared = Arc::clone(&shared);
                    let Some(held) = slots.request() else {
                        tokio::spawn(http::connection(shared, stream, http::Slot::Busy));
                        continue;
                    };
                    let touch = Touch(Arc::clone(&shared));
                    let slot = http::Slot::Open { held, slots: Arc::clone(&slots) };
                    tokio::spawn(async move {
                        http::connection(shared, stream, slot).await;
                        drop(touch);
                    });
                }
                Err(e) => {
                    // Out of descriptors or memory: wait a little rather than spin.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = tokio::time::sleep(POLL_INTERVAL), if exit_when_idle.is_some() => {}
        }
        if let Some(idle) = exit_when_idle {
            let quiet = slots.in_use() == 0 && lock(&shared.runs).running().is_none();
            if quiet && lock(&shared.last_activity).elapsed() >= idle {
                tracing::info!(
                    "no visitor for {}; exiting",
                    humantime::format_duration(idle)
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            fn run(&self, _: Trigger, _: &dyn Fn(&str)) -> Finished {
                unreachable!()
            }
        }
        let err = serve(&opts, Arc::new(Never)).unwrap_err();
        assert!(matches!(err, ServeError::NotLoopback(_)), "{err}");
        assert!(err.to_string().contains("loopback"), "{err}");
    }
}
