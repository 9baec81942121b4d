//! `sftp://`: one SSH connection made by the system's OpenSSH client (so
//! ssh_config, ProxyCommand, known_hosts and agent set-ups keep working), multiplexed
//! through a control socket, with SFTP spoken over it. A host key that does not match
//! known_hosts is a hard error (StrictHostKeyChecking). Every request of a run reuses it.
//! The connection is compressed: the bytes a poll or an update costs are what bento
//! promises to keep near the minimum (docs/benchmarks.md).

use std::io::SeekFrom;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use openssh::{ControlPersist, KnownHosts, SessionBuilder};
use openssh_sftp_client::error::SftpErrorKind;
use openssh_sftp_client::{Error as SftpError, Sftp, SftpOptions};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::{
    Connection, Item, LogItem, ObjectPart, RemoteError, Sink, Source, SshOptions, PARALLEL_FETCHES,
};
use crate::protocol::layout::{CURRENT, LOGS};

/// Bytes asked for per read request (the client clips it to what the server allows).
const READ_CHUNK: u64 = 64 * 1024;
/// The control master exits this long after the agent dies without closing it.
const MASTER_IDLE_SECS: usize = 5;

pub struct SftpConnection {
    rt: tokio::runtime::Runtime,
    sftp: Option<Sftp>,
    server: String,
    limits: Limits,
}

/// ssh's keep-alives go out this many times per `stall_timeout`. ssh gives up after four
/// unanswered intervals (`ServerAliveCountMax` 3, the default), so on a link that drops
/// everything ssh ends the connection at about two thirds of `stall_timeout`, before our own
/// timer: both ends are reported as the stall they are ([`Limits::op`]).
const KEEPALIVES_PER_STALL: u32 = 6;

/// How long one request may wait: `stall_timeout`, and never past the run's deadline.
#[derive(Debug, Clone)]
struct Limits {
    server: String,
    stall: Duration,
    deadline: Option<Instant>,
    quiet: Arc<Mutex<Quiet>>,
}

/// Since when the server has said nothing while a request waited: a connection that dies
/// after that long a silence was ended by ssh's keep-alive, i.e. the server stalled.
#[derive(Debug)]
struct Quiet {
    waiting: usize,
    since: Instant,
}

impl Limits {
    /// Runs one request, bounded: a server that stops answering (packets silently dropped)
    /// becomes an error naming the request, never a wait forever.
    async fn op<T>(
        &self,
        operation: impl FnOnce() -> String,
        fut: impl std::future::Future<Output = Result<T, RemoteError>>,
    ) -> Result<T, RemoteError> {
        let left = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        let budget = left.map_or(self.stall, |l| l.min(self.stall));
        self.begin();
        let result = tokio::time::timeout(budget, fut).await;
        let silence = self.end(matches!(&result, Ok(Ok(_))));
        match result {
            Ok(Ok(v)) => Ok(v),
            // A request that ended in a connection error after a silence of half the stall
            // timeout or more: ssh's keep-alive closed the dead link before our timer fired
            // ("read/flush task failed"). It is the same stall, and is reported as one.
            Ok(Err(RemoteError::Remote { message, .. }))
                if silence >= self.stall / 2 && lost_connection(&message) =>
            {
                Err(RemoteError::Stalled {
                    server: self.server.clone(),
                    operation: format!(
                        "{} (ssh's keep-alive closed the connection: {message})",
                        operation()
                    ),
                    waited: Duration::from_secs(silence.as_secs()),
                })
            }
            Ok(Err(e)) => Err(e),
            Err(_) if left.is_some_and(|l| l <= self.stall) => Err(RemoteError::RunTimeout {
                server: self.server.clone(),
                operation: operation(),
            }),
            Err(_) => Err(RemoteError::Stalled {
                server: self.server.clone(),
                operation: operation(),
                waited: budget,
            }),
        }
    }
}

impl Limits {
    fn new(server: &str, stall: Duration, deadline: Option<Instant>) -> Self {
        Self {
            server: server.to_owned(),
            stall,
            deadline,
            quiet: Arc::new(Mutex::new(Quiet {
                waiting: 0,
                since: Instant::now(),
            })),
        }
    }

    fn quiet(&self) -> std::sync::MutexGuard<'_, Quiet> {
        self.quiet.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request goes out: the silence starts now unless one is already waiting.
    fn begin(&self) {
        let mut q = self.quiet();
        if q.waiting == 0 {
            q.since = Instant::now();
        }
        q.waiting += 1;
    }

    /// A request ended; an answer ends the silence. Returns how long the server had been
    /// silent when it ended.
    fn end(&self, answered: bool) -> Duration {
        let mut q = self.quiet();
        q.waiting = q.waiting.saturating_sub(1);
        let silence = q.since.elapsed();
        if answered {
            q.since = Instant::now();
        }
        silence
    }
}

/// Whether an error from the SFTP client is about the connection (its reader or writer task
/// ended because ssh exited: "Background task failed: read/flush task failed") rather than an
/// answer from the server, which `openssh_sftp_client` words as below.
fn lost_connection(message: &str) -> bool {
    !message.starts_with("Sftp server reported error")
}

fn is_not_found(e: &SftpError) -> bool {
    matches!(e, SftpError::SftpError(SftpErrorKind::NoSuchFile, _))
}

impl SftpConnection {
    pub fn connect(
        user: &str,
        host: &str,
        port: u16,
        ssh: &SshOptions,
    ) -> Result<Self, RemoteError> {
        let server = format!("sftp://{user}@{host}:{port}");
        let connect_err = |message: String| RemoteError::Connect {
            server: server.clone(),
            message,
        };
        // ssh skips an `-i` file it cannot read and ends with "Permission denied
        // (publickey)", which names neither the file nor the setting.
        if let Err(e) = std::fs::File::open(&ssh.identity_file) {
            return Err(connect_err(format!(
                "identity_file {} (agent.toml) cannot be read: {e}; it must be this machine's private key, whose public half is key = \"…\" under its [hosts.NAME] in the server's bento.toml",
                ssh.identity_file.display()
            )));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| connect_err(e.to_string()))?;
        let control_dir =
            super::control_dir::prepare(&ssh.control_dir).map_err(|source| RemoteError::Local {
                path: ssh.control_dir.clone(),
                source,
            })?;
        let sftp = rt.block_on(async {
            let mut b = SessionBuilder::default();
            b.user(user.to_owned())
                .port(port)
                .keyfile(&ssh.identity_file)
                .user_known_hosts_file(&ssh.known_hosts)
                .known_hosts_check(KnownHosts::Strict)
                .connect_timeout(ssh.connect_timeout)
                // zlib after authentication: manifests are mostly paths and hex digests
                // and text objects compress well (measured: a one-file change in a 400-file
                // configuration moves 30 kB instead of 85 kB); on a no-change poll it saves
                // more than it costs (8.3 kB instead of 9.0 kB; docs/benchmarks.md).
                .compression(true)
                // Keep-alives inside the encrypted channel: ssh itself gives up on a link
                // that silently drops packets after about three of them (ServerAliveCountMax).
                .server_alive_interval(
                    (ssh.stall_timeout / KEEPALIVES_PER_STALL).max(Duration::from_secs(1)),
                )
                .control_directory(&control_dir)
                .control_persist(ControlPersist::IdleFor(
                    NonZeroUsize::new(MASTER_IDLE_SECS).expect("non-zero"),
                ));
            // ssh's ConnectTimeout covers the TCP connect only; bound the whole login too.
            let session = tokio::time::timeout(ssh.connect_timeout * 2, b.connect_mux(host))
                .await
                .map_err(|_| {
                    connect_err(format!("no answer within {:?}", ssh.connect_timeout * 2))
                })?
                .map_err(|e| connect_err(ssh_error_text(&e)))?;
            Sftp::from_session(session, SftpOptions::new().flush_interval(Duration::ZERO))
                .await
                .map_err(|e| connect_err(format!("SFTP: {e}")))
        })?;
        Ok(Self {
            rt,
            sftp: Some(sftp),
            limits: Limits::new(&server, ssh.stall_timeout, ssh.deadline),
            server,
        })
    }

    fn sftp(&self) -> &Sftp {
        self.sftp.as_ref().expect("open until closed")
    }
}

/// ssh's own words (host key mismatch, permission denied) are the useful part.
fn ssh_error_text(e: &openssh::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn remote(path: &str, e: SftpError) -> RemoteError {
    RemoteError::Remote {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Reads at most `limit` bytes of `path`; `Ok(None)` when it does not exist.
async fn read_limited(
    sftp: &Sftp,
    lim: &Limits,
    path: &str,
    limit: u64,
) -> Result<Option<Vec<u8>>, RemoteError> {
    let opened = lim
        .op(|| format!("opening {path}"), async {
            Ok(sftp.open(path).await)
        })
        .await?;
    let mut file = match opened {
        Ok(f) => f,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(remote(path, e)),
    };
    let mut out = Vec::new();
    loop {
        let want = (limit + 1 - out.len() as u64).min(READ_CHUNK) as u32;
        let chunk = lim
            .op(|| format!("reading {path}"), async {
                file.read(want, BytesMut::new())
                    .await
                    .map_err(|e| remote(path, e))
            })
            .await?;
        match chunk {
            None => break,
            Some(chunk) => {
                out.extend_from_slice(&chunk);
                if out.len() as u64 > limit {
                    return Err(RemoteError::TooLarge {
                        path: path.to_owned(),
                        limit,
                    });
                }
                if (chunk.len() as u32) < want {
                    // A short read: the file ended (OpenSSH reads regular files in full).
                    // The client advanced its offset by `want`; put it where the data ends.
                    seek_to(&mut file, path, out.len() as u64).await?;
                    if path == CURRENT {
                        break;
                    }
                }
            }
        }
    }
    lim.op(|| format!("closing {path}"), async {
        file.close().await.map_err(|e| remote(path, e))
    })
    .await?;
    Ok(Some(out))
}

/// Moves the file's read position (the client keeps it; no round trip).
async fn seek_to(
    file: &mut openssh_sftp_client::file::File,
    path: &str,
    at: u64,
) -> Result<(), RemoteError> {
    file.seek(SeekFrom::Start(at))
        .await
        .map(|_| ())
        .map_err(|e| RemoteError::Remote {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

/// Appends at most `part.max` bytes of the object, from `part.from`, to `part.dest`.
async fn read_part(sftp: &Sftp, lim: &Limits, part: &ObjectPart) -> Result<u64, RemoteError> {
    let rel = part.item.path();
    let local = |source| RemoteError::Local {
        path: part.dest.clone(),
        source,
    };
    let mut out = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&part.dest)
        .await
        .map_err(local)?;
    let mut fetched = 0;
    let mut file = lim
        .op(|| format!("opening {rel}"), async {
            sftp.open(&rel).await.map_err(|e| remote(&rel, e))
        })
        .await?;
    seek_to(&mut file, &rel, part.from).await?;
    while fetched < part.max {
        let want = (part.max - fetched).min(READ_CHUNK) as u32;
        let read = lim
            .op(
                || format!("reading {rel} at byte {}", part.from + fetched),
                async {
                    file.read(want, BytesMut::new())
                        .await
                        .map_err(|e| remote(&rel, e))
                },
            )
            .await?;
        let Some(chunk) = read else {
            break;
        };
        out.write_all(&chunk).await.map_err(local)?;
        fetched += chunk.len() as u64;
        if (chunk.len() as u32) < want {
            seek_to(&mut file, &rel, part.from + fetched).await?;
        }
    }
    lim.op(|| format!("closing {rel}"), async {
        file.close().await.map_err(|e| remote(&rel, e))
    })
    .await?;
    out.sync_all().await.map_err(local)?;
    Ok(fetched)
}

/// The size of `path`, `None` when it does not exist.
async fn size_of(sftp: &Sftp, lim: &Limits, path: &str) -> Result<Option<u64>, RemoteError> {
    let meta = lim
        .op(|| format!("the size of {path}"), async {
            Ok(sftp.fs().metadata(path).await)
        })
        .await?;
    match meta {
        // A server that does not say the size leaves the limit to `read`.
        Ok(m) => Ok(Some(m.len().unwrap_or(0))),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(remote(path, e)),
    }
}

impl Source for SftpConnection {
    fn size(&mut self, item: Item) -> Result<Option<u64>, RemoteError> {
        let path = item.path();
        let sftp = self.sftp();
        self.rt.block_on(size_of(sftp, &self.limits, &path))
    }

    fn size_many(&mut self, items: &[Item]) -> Result<Vec<Option<u64>>, RemoteError> {
        let sftp = self.sftp();
        let lim = &self.limits;
        let paths: Vec<String> = items.iter().map(Item::path).collect();
        self.rt.block_on(
            stream::iter(paths.iter().map(|p| size_of(sftp, lim, p)))
                .buffered(PARALLEL_FETCHES)
                .try_collect(),
        )
    }

    fn read(&mut self, item: Item, limit: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        let path = item.path();
        let sftp = self.sftp();
        self.rt
            .block_on(read_limited(sftp, &self.limits, &path, limit))
    }

    fn read_objects(&mut self, parts: &[ObjectPart]) -> Result<u64, RemoteError> {
        let sftp = self.sftp();
        self.rt.block_on(async {
            let lim = &self.limits;
            let sizes: Vec<u64> = stream::iter(parts.iter().map(|p| read_part(sftp, lim, p)))
                .buffer_unordered(PARALLEL_FETCHES)
                .try_collect()
                .await?;
            Ok(sizes.iter().sum())
        })
    }

    fn read_many(
        &mut self,
        items: &[Item],
        limit: u64,
    ) -> Result<Vec<Option<Vec<u8>>>, RemoteError> {
        let sftp = self.sftp();
        let lim = &self.limits;
        let paths: Vec<String> = items.iter().map(Item::path).collect();
        self.rt.block_on(
            stream::iter(paths.iter().map(|p| read_limited(sftp, lim, p, limit)))
                .buffered(PARALLEL_FETCHES)
                .try_collect(),
        )
    }
}

impl Sink for SftpConnection {
    fn put(&mut self, item: LogItem<'_>, bytes: &[u8]) -> Result<(), RemoteError> {
        let path = item.path();
        let path = path.as_str();
        let sftp = self.sftp();
        let target = format!("{LOGS}/{path}");
        let tmp = format!(
            "{LOGS}/{}{}",
            crate::sys::atomic::TMP_PREFIX,
            path.replace('/', "-")
        );
        let lim = &self.limits;
        // Reports and heartbeats are small: the whole upload is one bounded request.
        self.rt
            .block_on(lim.op(|| format!("writing {target}"), async {
                if let Some((dir, _)) = target.rsplit_once('/') {
                    if dir != LOGS {
                        let mut fs = sftp.fs();
                        match fs.metadata(dir).await {
                            Ok(_) => {}
                            Err(e) if is_not_found(&e) => {
                                fs.create_dir(dir).await.map_err(|e| remote(dir, e))?
                            }
                            Err(e) => return Err(remote(dir, e)),
                        }
                    }
                }
                let mut file = sftp
                    .options()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&tmp)
                    .await
                    .map_err(|e| remote(&tmp, e))?;
                file.write_all(bytes).await.map_err(|e| remote(&tmp, e))?;
                file.close().await.map_err(|e| remote(&tmp, e))?;
                // posix-rename (OpenSSH): atomic, and replaces the previous file.
                let mut fs = sftp.fs();
                fs.rename(&tmp, &target)
                    .await
                    .map_err(|e| remote(&target, e))
            }))
    }
}

impl Connection for SftpConnection {
    fn close(mut self: Box<Self>) -> Result<(), RemoteError> {
        if let Some(sftp) = self.sftp.take() {
            let server = self.server.clone();
            let lim = &self.limits;
            self.rt
                .block_on(lim.op(|| "closing the connection".into(), async {
                    sftp.close().await.map_err(|e| RemoteError::Connect {
                        server,
                        message: format!("closing: {e}"),
                    })
                }))?;
        }
        Ok(())
    }
}

impl Drop for SftpConnection {
    fn drop(&mut self) {
        // Close politely so the control master exits now rather than after its idle time.
        if let Some(sftp) = self.sftp.take() {
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), sftp.close()).await
            });
        }
    }
}
