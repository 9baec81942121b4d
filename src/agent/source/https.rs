//! `https://`: a read-only mirror of the host's tree on a static web server (or a CDN in
//! front of a copy made with `bento publish --export`): the chroot's keys under one URL,
//! plain GETs, `Range` to resume. `http://` only for a loopback address.
//!
//! Invariants: nothing is ever written to it (every [`Sink::put`] is
//! [`RemoteError::ReadOnly`], so reports stay in the spool); what it serves is checked by
//! `agent::fetch` exactly as what any other source serves; parallel reads stay within
//! [`super::PARALLEL_FETCHES`].

use super::parallel::Requests;
use super::{Connection, Item, LogItem, ObjectPart, RemoteError, Sink, SshOptions};
use crate::sys::http::{Client, HttpError, Options};

pub struct HttpsConnection {
    client: Client,
    server: String,
}

impl HttpsConnection {
    /// Prepares the client; no request is made (the first read proves the server is there).
    pub fn connect(base: &str, opts: &SshOptions) -> Result<Self, RemoteError> {
        let client = Client::new(
            base,
            &Options {
                stall_timeout: opts.stall_timeout,
                deadline: opts.deadline,
                ca_file: opts.s3.ca_file.clone(),
            },
        )
        .map_err(|e| RemoteError::Connect {
            server: base.to_owned(),
            message: e.to_string(),
        })?;
        Ok(HttpsConnection {
            client,
            server: base.to_owned(),
        })
    }

    fn error(&self, rel: &str, e: HttpError) -> RemoteError {
        match e {
            HttpError::TooLarge { limit, .. } => RemoteError::TooLarge {
                path: rel.to_owned(),
                limit,
            },
            HttpError::Stalled {
                operation, waited, ..
            } => RemoteError::Stalled {
                server: self.server.clone(),
                operation: format!("{operation} {rel}"),
                waited,
            },
            HttpError::Deadline { operation, .. } => RemoteError::RunTimeout {
                server: self.server.clone(),
                operation: format!("{operation} {rel}"),
            },
            // No answer at all: the server is not there (as a refused SSH connection is).
            HttpError::Transport { message, .. } => RemoteError::Connect {
                server: self.server.clone(),
                message,
            },
            e => RemoteError::Remote {
                path: rel.to_owned(),
                message: e.to_string(),
            },
        }
    }
}

impl Requests for HttpsConnection {
    fn size_of(&self, item: Item) -> Result<Option<u64>, RemoteError> {
        let rel = item.path();
        self.client.size(&rel).map_err(|e| self.error(&rel, e))
    }

    fn read_item(&self, item: Item, limit: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        let rel = item.path();
        self.client
            .get(&rel, limit)
            .map_err(|e| self.error(&rel, e))
    }

    fn read_part(&self, part: &ObjectPart) -> Result<u64, RemoteError> {
        let rel = part.item.path();
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
            .get_range(&rel, part.from, part.max, &mut out)
            .map_err(|e| match e {
                HttpError::Write { source, .. } => local(source),
                e => self.error(&rel, e),
            })?;
        out.sync_all().map_err(local)?;
        got.ok_or(RemoteError::NotFound { path: rel })
    }
}

impl Sink for HttpsConnection {
    fn put(&mut self, _item: LogItem<'_>, _bytes: &[u8]) -> Result<(), RemoteError> {
        Err(RemoteError::ReadOnly {
            server: self.server.clone(),
        })
    }
}

impl Connection for HttpsConnection {
    fn close(self: Box<Self>) -> Result<(), RemoteError> {
        Ok(())
    }
}
