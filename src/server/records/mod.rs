//! The publisher's own records, kept outside the served tree where no host account can
//! write: the highest serial numbered per host (`serials/<host>`), rollback holds
//! (`holds/<host>.json`), the journal (`journal.jsonl`) and the system each host's
//! configuration evaluated to (`systems/<host>.json`). One function says where
//! they live ([`dir`]), so the place can move (an object-store fleet keeps them elsewhere)
//! without touching what reads and writes them. A serial record only ever grows.

mod holds;
mod journal;
mod systems;

use std::path::{Path, PathBuf};

pub use holds::{Hold, Holds};
pub use journal::{operator, rolled_back, Entry, Journal, JournalHost};
pub use systems::{SystemRecord, Systems};

use crate::protocol::layout::Chroot;
use crate::protocol::HostName;

/// Where the publisher keeps its records: today the chroot's root-only `.bento/`.
pub fn dir(chroot: &Chroot) -> PathBuf {
    chroot.state_dir()
}

/// Creates a records directory, root-only like the rest of the publisher's state.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// The serial record of one host: the highest serial this publisher numbered for it.
#[derive(Debug, Clone)]
pub struct Serials {
    dir: PathBuf,
    /// Raises wait for this batch's commit (a publish commits it before any `current`
    /// names a version with the serial raised).
    batch: Option<std::sync::Arc<crate::sys::batch::Batch>>,
    /// Each record as read or raised by this value: read once, since whoever numbers holds
    /// the publisher's lock (a publish asks for a host's record four times). Raised in a
    /// batch, it is what `get` says until the commit writes it.
    known: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<HostName, Option<u64>>>>,
}

impl Serials {
    pub fn new(records: &Path) -> Self {
        Self {
            dir: records.join("serials"),
            batch: None,
            known: Default::default(),
        }
    }

    /// Records that are raised as part of `batch`.
    pub fn in_batch(self, batch: std::sync::Arc<crate::sys::batch::Batch>) -> Self {
        Self {
            batch: Some(batch),
            ..self
        }
    }

    fn path(&self, host: &HostName) -> PathBuf {
        self.dir.join(host.as_str())
    }

    /// The recorded serial; `None` when there is no record (a first publish by a bento that
    /// keeps one, or a lost state directory). An unreadable record is an error: guessing
    /// could number below what hosts applied.
    pub fn get(&self, host: &HostName) -> std::io::Result<Option<u64>> {
        if let Some(known) = self.known.lock().expect("serials lock").get(host) {
            return Ok(*known);
        }
        let read = self.read(host)?;
        let mut known = self.known.lock().expect("serials lock");
        // A raise by another thread meanwhile wins: it is the higher.
        Ok(*known.entry(host.clone()).or_insert(read))
    }

    fn read(&self, host: &HostName) -> std::io::Result<Option<u64>> {
        let path = self.path(host);
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map(Some).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: not a serial: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Raises the record to `serial` (never lowers it), durably (or with its batch), before
    /// a manifest with that serial is written.
    pub fn raise(&self, host: &HostName, serial: u64) -> std::io::Result<()> {
        if self.get(host)?.is_some_and(|s| s >= serial) {
            return Ok(());
        }
        private_dir(&self.dir)?;
        let bytes = format!("{serial}\n");
        match &self.batch {
            Some(batch) => batch.write(&self.path(host), bytes.as_bytes(), 0o600)?,
            None => crate::sys::atomic::write_file(&self.path(host), bytes.as_bytes(), 0o600)?,
        }
        self.known
            .lock()
            .expect("serials lock")
            .insert(host.clone(), Some(serial));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_only_grows_and_a_bad_one_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let s = Serials::new(t.path());
        let h = HostName::new("web1").unwrap();
        assert_eq!(s.get(&h).unwrap(), None);
        s.raise(&h, 7).unwrap();
        s.raise(&h, 3).unwrap();
        assert_eq!(s.get(&h).unwrap(), Some(7));
        assert_eq!(Serials::new(t.path()).get(&h).unwrap(), Some(7), "on disk");
        std::fs::write(t.path().join("serials/web1"), "x").unwrap();
        let fresh = Serials::new(t.path());
        assert!(fresh
            .get(&h)
            .unwrap_err()
            .to_string()
            .contains("serials/web1"));
    }

    #[test]
    fn a_record_raised_in_a_batch_counts_at_once_and_is_written_by_the_commit() {
        let t = tempfile::tempdir().unwrap();
        let batch = std::sync::Arc::new(crate::sys::batch::Batch::new(vec![t.path().into()]));
        let s = Serials::new(t.path()).in_batch(batch.clone());
        let h = HostName::new("web1").unwrap();
        s.raise(&h, 5).unwrap();
        s.raise(&h, 3).unwrap();
        assert_eq!(s.get(&h).unwrap(), Some(5));
        assert!(
            !t.path().join("serials/web1").exists(),
            "not before the commit"
        );
        batch.commit().unwrap();
        assert_eq!(Serials::new(t.path()).get(&h).unwrap(), Some(5));
    }
}
