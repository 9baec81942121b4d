//! What a host wrote, read for its status row: the notes a row gathers (each once, the
//! host's doing told apart from the server failing to read), and the host-written JSON
//! files of `logs/` with when the server received them. Nothing here trusts a host's size,
//! type or text: too large, refused and unparsable files are notes, never values.

use std::time::SystemTime;

use super::memo::{HostMemo, Slot};
use crate::nix::StorePath;
use crate::protocol::layout::{Key, SubPath};
use crate::protocol::report::{HEARTBEAT_FILE, LATEST_FILE};
use crate::protocol::HostName;
use crate::server::logs::{self, LogsError};
use crate::server::store::HostReader;
use crate::server::store::Store;
use crate::sys::stamp::Stamp;
use crate::sys::terminal::truncate;

/// The longest note quoting host-written text (a parse error, a bad field).
const MAX_NOTE_CHARS: usize = 200;

/// What a row says besides its state, each thing once (`logs/` that cannot be opened is
/// the same error for every file in it), and whether a file could not be read at all.
#[derive(Default)]
pub(super) struct Notes {
    pub(super) list: Vec<String>,
    pub(super) unreadable: bool,
    /// A file the host wrote was there but refused (a link, too large, not parsable, for
    /// another host).
    pub(super) refused: bool,
}

impl Notes {
    pub(super) fn push(&mut self, note: String) {
        if !self.list.contains(&note) {
            self.list.push(note);
        }
    }

    /// The host wrote a file that is not used: noted, and remembered (see `host_status`).
    pub(super) fn refused(&mut self, note: String) {
        self.refused = true;
        self.push(note);
    }

    /// A file status depends on could not be read: the state is not to be trusted.
    pub(super) fn unreadable(&mut self, note: String) {
        self.unreadable = true;
        self.push(note);
    }
}

/// Keeps a host-written store path only when it is one: anything else is a note, so what
/// the table shows of a host's systems is always a store path or nothing.
/// `file` and `field` name it in the note.
pub(super) fn store_path(value: &mut Option<String>, file: &str, field: &str, notes: &mut Notes) {
    if let Some(text) = value.as_deref() {
        if StorePath::new(text).is_err() {
            notes.push(format!(
                "logs/{file}: {field} is not a store path: \"{}\"",
                truncate(text, 64)
            ));
            *value = None;
        }
    }
}

/// When the server received a host's files, as far as reading them told.
#[derive(Default)]
pub(super) struct Received {
    /// The newest time a file read and parsed gave.
    at: Option<SystemTime>,
    /// A file was there but not read whole (too large, unreadable): a listing of `logs/`
    /// may still see when it came.
    partial: bool,
}

impl Received {
    /// When the server received the host's newest heartbeat or report: as the reads said
    /// (an object store's Last-Modified, the chroot's modification time), or when they did
    /// not, or a file was there but not read whole, as the listing of `logs/` says.
    pub(super) fn resolve(self, store: &dyn Store, host: &HostName) -> Option<SystemTime> {
        match self {
            Received { partial: true, at } => at.max(super::skew::received(store, host)),
            Received { at: Some(at), .. } => Some(at),
            Received { at: None, .. } => super::skew::received(store, host),
        }
    }
}

/// Reads one host-written JSON file of `logs/` (`read`: what the store gave for it); a
/// missing file is `None`, anything refused or unparsable is a note for the row.
/// `received` learns when the store received it, when the read tells.
pub(super) fn read_log<T: serde::de::DeserializeOwned>(
    read: Result<(Vec<u8>, Option<SystemTime>), LogsError>,
    name: &str,
    parse: fn(&[u8]) -> Result<T, serde_json::Error>,
    notes: &mut Notes,
    received: &mut Received,
) -> Option<T> {
    match read {
        Ok((bytes, at)) if bytes.len() as u64 <= crate::protocol::report::MAX_REPORT_BYTES => {
            received.at = received.at.max(at);
            match parse(&bytes) {
                Ok(v) => Some(v),
                Err(e) => {
                    // serde quotes what it could not place (an unknown field's name): cut it
                    // short, a host is not trusted to be brief.
                    let e = e.to_string();
                    notes.refused(format!("logs/{name}: {}", truncate(&e, MAX_NOTE_CHARS)));
                    None
                }
            }
        }
        Ok(_) => {
            received.partial = true;
            notes.refused(format!(
                "logs/{name}: larger than {} bytes, not read",
                crate::protocol::report::MAX_REPORT_BYTES
            ));
            None
        }
        Err(LogsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
        // The server could not read it (permissions, I/O): not something the host did.
        Err(e @ LogsError::Io { .. }) => {
            received.partial = true;
            notes.unreadable(e.to_string());
            None
        }
        // Refused (a link, too large): the host's doing, shown as such.
        Err(e) => {
            received.partial |= matches!(e, LogsError::TooLarge { .. });
            notes.refused(e.to_string());
            None
        }
    }
}

/// The files of `logs/` status reads: each one's memo slot, name and key (made once: the
/// key is asked for its stamp for every host).
pub(super) static LOGS: std::sync::LazyLock<[(Slot, &str, Key); 2]> =
    std::sync::LazyLock::new(|| {
        let log = |name| Key::Log(SubPath::new(name).expect("a file name"));
        [
            (Slot::Heartbeat, HEARTBEAT_FILE, log(HEARTBEAT_FILE)),
            (Slot::Latest, LATEST_FILE, log(LATEST_FILE)),
        ]
    });

/// The host's heartbeat and newest report, each as remembered when unchanged, else as
/// read, with the stamp of what was read (to keep).
pub(super) fn read_logs(
    reader: &HostReader<'_>,
    memo: &mut HostMemo<'_>,
) -> [(Result<logs::Received, LogsError>, Option<Stamp>); 2] {
    let known = LOGS.each_ref().map(|(slot, _, key)| {
        let bytes = memo.get(*slot, || reader.stamp(key))?.to_vec();
        Some((bytes, memo.stamped(*slot).map(|s| s.modified())))
    });
    let missing: Vec<&str> = (LOGS.iter().zip(&known))
        .filter(|(_, k)| k.is_none())
        .map(|((_, name, _), _)| *name)
        .collect();
    let mut read = reader.read_logs_received(&missing).into_iter();
    known.map(|k| match k {
        Some(got) => (Ok(got), None),
        None => match read.next().expect("one result per name") {
            Ok((got, stamp)) => (Ok(got), stamp),
            Err(e) => (Err(e), None),
        },
    })
}
