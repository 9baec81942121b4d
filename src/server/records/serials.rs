//! The serial record: the highest serial this publisher numbered for each host, one file for
//! the fleet (`serials.log`). A raise appends a line `<host> <serial>`; the highest line of a
//! host is its record. Appending, not a file per host renamed into place, because a publish
//! raises the record of every host it gives a new version: a new file per host per run was a
//! third of what a one-file change costs a 1,000-host chroot. The log is rewritten whole
//! (compacted, crash-safe) once it holds a few lines per host, and records kept by earlier
//! bentos (`serials/<host>`) are folded into it and removed then. Invariant: a record only
//! ever grows, and a raise is durable before any manifest numbered with it is live.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::protocol::HostName;
use crate::sys::batch::Batch;

/// The log's name in the records directory.
const LOG: &str = "serials.log";
/// Where earlier bentos kept a file per host.
const LEGACY: &str = "serials";

/// The serial records of a fleet. Clones share what was read and raised.
#[derive(Debug, Clone)]
pub struct Serials {
    dir: PathBuf,
    /// Raises wait for this batch's commit (a publish commits it before any `current`
    /// names a version with the serial raised).
    batch: Option<Arc<Batch>>,
    /// The records, read once (whoever numbers holds the publisher's lock): what `get`
    /// says, a raise in a batch included before the commit makes it durable.
    table: Arc<Mutex<Option<Table>>>,
}

#[derive(Debug, Default)]
struct Table {
    known: HashMap<HostName, u64>,
    /// Lines in the log: past a few per host, the next raise compacts it.
    lines: usize,
    /// Per-host files of an earlier bento were read: the next raise compacts, then removes
    /// them.
    legacy: bool,
    /// The log ends in a torn line: the next raise compacts (an append would join it).
    torn: bool,
    /// The log, open for appending once a raise needed it.
    log: Option<Arc<File>>,
}

impl Table {
    /// Keeps `serial` for `host` if it is the highest read so far.
    fn keep(&mut self, host: HostName, serial: u64) {
        let s = self.known.entry(host).or_insert(serial);
        *s = (*s).max(serial);
    }
}

impl Serials {
    pub fn new(records: &Path) -> Self {
        Self {
            dir: records.to_owned(),
            batch: None,
            table: Arc::default(),
        }
    }

    /// Records that are raised as part of `batch`.
    pub fn in_batch(self, batch: Arc<Batch>) -> Self {
        Self {
            batch: Some(batch),
            ..self
        }
    }

    /// The recorded serial; `None` when there is no record (a first publish by a bento that
    /// keeps one, or a lost state directory). An unreadable record is an error: guessing
    /// could number below what hosts applied.
    pub fn get(&self, host: &HostName) -> io::Result<Option<u64>> {
        Ok(self
            .table()?
            .as_ref()
            .and_then(|t| t.known.get(host).copied()))
    }

    /// The table, read on first use.
    fn table(&self) -> io::Result<MutexGuard<'_, Option<Table>>> {
        let mut table = self.table.lock().expect("serials lock");
        if table.is_none() {
            *table = Some(read(&self.dir)?);
        }
        Ok(table)
    }

    /// Raises the record to `serial` (never lowers it), durably (or with its batch), before
    /// a manifest with that serial is written.
    pub fn raise(&self, host: &HostName, serial: u64) -> io::Result<()> {
        let mut guard = self.table()?;
        let table = guard.as_mut().expect("read by table()");
        if table.known.get(host).is_some_and(|&s| s >= serial) {
            return Ok(());
        }
        super::private_dir(&self.dir).map_err(|e| at(&self.dir, e))?;
        let path = self.dir.join(LOG);
        if table.legacy || table.torn || table.lines >= 4 * table.known.len().max(256) {
            let mut known = table.known.clone();
            known.insert(host.clone(), serial);
            // Durable at once, batch or not: the lines it replaces are gone with the rename.
            crate::sys::atomic::write_file(&path, &lines(&known), 0o600)
                .map_err(|e| at(&path, e))?;
            table.log = None;
            table.torn = false;
            table.lines = known.len();
            table.known = known;
            if std::mem::take(&mut table.legacy) {
                remove_legacy(&self.dir.join(LEGACY));
            }
            return Ok(());
        }
        let log = match &table.log {
            Some(log) => log.clone(),
            None => {
                let created = !path.exists();
                let file = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| at(&path, e))?;
                if created && self.batch.is_none() {
                    crate::sys::atomic::sync_dir(&self.dir).map_err(|e| at(&self.dir, e))?;
                }
                table.log.insert(Arc::new(file)).clone()
            }
        };
        // One write of a whole line, appended: a crash leaves at most a torn last line,
        // which `read` ignores (its serial was never live: its sync had not returned).
        if let Err(e) = (&*log).write_all(format!("{host} {serial}\n").as_bytes()) {
            // Part of the line may be there (a full disk): the next raise rewrites the log
            // rather than append to it.
            table.torn = true;
            return Err(at(&path, e));
        }
        table.lines += 1;
        table.known.insert(host.clone(), serial);
        drop(guard);
        match &self.batch {
            Some(batch) => batch.sync(&path),
            // Outside the lock: other hosts' raises append meanwhile, and the syncs overlap.
            None => log.sync_data().map_err(|e| at(&path, e))?,
        }
        Ok(())
    }
}

fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn bad(path: &Path, what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

/// The log's bytes for `known`, one line per host, in host order.
fn lines(known: &HashMap<HostName, u64>) -> Vec<u8> {
    let mut hosts: Vec<(&HostName, &u64)> = known.iter().collect();
    hosts.sort();
    let mut out = Vec::with_capacity(hosts.len() * 24);
    for (host, serial) in hosts {
        writeln!(out, "{host} {serial}").expect("writing to memory");
    }
    out
}

/// Reads the log and any per-host records an earlier bento left, keeping each host's
/// highest serial.
fn read(dir: &Path) -> io::Result<Table> {
    let mut table = Table::default();
    let path = dir.join(LOG);
    match fs::read(&path) {
        Ok(bytes) => {
            // A last line without its newline is a torn append: never synced, never live.
            let whole = bytes
                .iter()
                .rposition(|&b| b == b'\n')
                .map(|end| &bytes[..end]);
            table.torn = bytes.last().is_some_and(|&b| b != b'\n');
            let lines = whole.into_iter().flat_map(|w| w.split(|&b| b == b'\n'));
            for (n, line) in lines.enumerate() {
                let parsed = std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| l.split_once(' '))
                    .and_then(|(h, s)| Some((HostName::new(h).ok()?, s.parse::<u64>().ok()?)));
                let Some((host, serial)) = parsed else {
                    return Err(bad(
                        &path,
                        format!(
                            "line {}: not a serial record (`<host> <serial>`): {:?}",
                            n + 1,
                            String::from_utf8_lossy(line)
                        ),
                    ));
                };
                table.lines += 1;
                table.keep(host, serial);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(at(&path, e)),
    }
    let legacy = dir.join(LEGACY);
    let entries = match fs::read_dir(&legacy) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(table),
        Err(e) => return Err(at(&legacy, e)),
    };
    table.legacy = true;
    for entry in entries {
        let entry = entry.map_err(|e| at(&legacy, e))?;
        // Temporary files a killed run left, and anything not named for a host.
        let Some(host) = entry
            .file_name()
            .to_str()
            .and_then(|n| HostName::new(n).ok())
        else {
            continue;
        };
        let path = entry.path();
        let text = fs::read_to_string(&path).map_err(|e| at(&path, e))?;
        let serial: u64 = text
            .trim()
            .parse()
            .map_err(|e| bad(&path, format!("not a serial: {e}")))?;
        table.keep(host, serial);
    }
    Ok(table)
}

/// Removes the per-host records once the log holds them, durably. What cannot be removed
/// stays (it is read again, and is never above the log): a warning, not an error.
fn remove_legacy(legacy: &Path) {
    if let Err(e) = fs::remove_dir_all(legacy) {
        tracing::warn!(
            "{}: could not remove the per-host serial records (kept in {LOG} now): {e}",
            legacy.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> HostName {
        HostName::new(name).unwrap()
    }

    #[test]
    fn a_record_only_grows_and_a_bad_one_is_an_error_naming_the_file() {
        let t = tempfile::tempdir().unwrap();
        let s = Serials::new(t.path());
        let h = host("web1");
        assert_eq!(s.get(&h).unwrap(), None);
        s.raise(&h, 7).unwrap();
        s.raise(&h, 3).unwrap();
        s.raise(&host("db1"), 2).unwrap();
        assert_eq!(s.get(&h).unwrap(), Some(7));
        let fresh = Serials::new(t.path());
        assert_eq!(fresh.get(&h).unwrap(), Some(7), "on disk");
        assert_eq!(fresh.get(&host("db1")).unwrap(), Some(2));
        assert_eq!(fresh.get(&host("mail")).unwrap(), None);

        fs::write(t.path().join(LOG), "web1 7\nweb1 x\n").unwrap();
        let err = Serials::new(t.path()).get(&h).unwrap_err().to_string();
        assert!(err.contains("serials.log: line 2"), "{err}");
        fs::write(t.path().join(LOG), "web1 7\n").unwrap();
        fs::create_dir(t.path().join(LEGACY)).unwrap();
        fs::write(t.path().join("serials/web1"), "x").unwrap();
        let err = Serials::new(t.path()).get(&h).unwrap_err().to_string();
        assert!(err.contains("serials/web1"), "{err}");
    }

    #[test]
    fn a_torn_last_line_is_not_a_record() {
        let t = tempfile::tempdir().unwrap();
        // A crash in the middle of an append: that serial was never synced, so never live.
        fs::write(t.path().join(LOG), "web1 7\nweb1 9").unwrap();
        let s = Serials::new(t.path());
        assert_eq!(s.get(&host("web1")).unwrap(), Some(7));
        s.raise(&host("db1"), 1).unwrap();
        let fresh = Serials::new(t.path());
        assert_eq!(fresh.get(&host("db1")).unwrap(), Some(1));
        assert_eq!(fresh.get(&host("web1")).unwrap(), Some(7));
    }

    #[test]
    fn records_of_an_earlier_bento_are_kept_and_folded_into_the_log() {
        let t = tempfile::tempdir().unwrap();
        let legacy = t.path().join(LEGACY);
        fs::create_dir(&legacy).unwrap();
        fs::write(legacy.join("web1"), "41\n").unwrap();
        fs::write(legacy.join("db1"), "5\n").unwrap();
        fs::write(legacy.join(".tmp-123-0-db1"), "99\n").unwrap();
        // A log written by a downgraded-then-upgraded publisher, lower for web1.
        fs::write(t.path().join(LOG), "web1 40\n").unwrap();
        let s = Serials::new(t.path());
        assert_eq!(s.get(&host("web1")).unwrap(), Some(41));
        assert_eq!(
            s.get(&host("db1")).unwrap(),
            Some(5),
            "a killed run's temp is no record"
        );
        s.raise(&host("mail"), 3).unwrap();
        assert!(!legacy.exists(), "folded into the log, then removed");
        let fresh = Serials::new(t.path());
        for (h, serial) in [("web1", 41), ("db1", 5), ("mail", 3)] {
            assert_eq!(fresh.get(&host(h)).unwrap(), Some(serial), "{h}");
        }
    }

    #[test]
    fn a_long_log_is_compacted_to_a_line_per_host() {
        let t = tempfile::tempdir().unwrap();
        let s = Serials::new(t.path());
        let (a, b) = (host("a"), host("b"));
        for serial in 1..=600 {
            s.raise(&a, serial).unwrap();
            s.raise(&b, serial * 2).unwrap();
        }
        let text = fs::read_to_string(t.path().join(LOG)).unwrap();
        assert!(
            text.lines().count() < 1024,
            "{} lines",
            text.lines().count()
        );
        let fresh = Serials::new(t.path());
        assert_eq!(fresh.get(&a).unwrap(), Some(600));
        assert_eq!(fresh.get(&b).unwrap(), Some(1200));
    }

    #[test]
    fn a_record_raised_in_a_batch_counts_at_once_and_the_commit_makes_it_durable() {
        let t = tempfile::tempdir().unwrap();
        let batch = Arc::new(Batch::new(vec![t.path().into()]));
        let s = Serials::new(t.path()).in_batch(batch.clone());
        let h = host("web1");
        s.raise(&h, 5).unwrap();
        s.raise(&h, 3).unwrap();
        s.raise(&host("db1"), 1).unwrap();
        assert_eq!(s.get(&h).unwrap(), Some(5));
        assert_eq!(batch.commit().unwrap(), 1, "the log, synced once");
        assert_eq!(Serials::new(t.path()).get(&h).unwrap(), Some(5));
    }
}
