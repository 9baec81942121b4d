//! What `bento status` read of each host's files (`current`, `logs/heartbeat.json` and
//! `logs/latest.json`), remembered across runs in the publisher's state
//! (`.bento/status-files`) under each file's stamp (`sys::stamp`: device, inode, size,
//! modification and change times). A file whose stamp is what it was costs one stat, not
//! an open, a stat, a read and a close: a 10,000-host run over an unchanged fleet makes a
//! third of the system calls it made. A stamp is remembered only once the file's last
//! change is older than the racy window, so no later write can keep its stamp; anything
//! else is read as before. What is remembered is what a read gave and passed the parser
//! (the newest report without its log tail and checks, which status never reads), and it
//! is parsed and checked again on every run exactly as a read file is. Only the chroot
//! stamps files; an object store's hosts are read every run.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::protocol::report::Report;
use crate::protocol::HostName;
use crate::sys::binary::Reader;
use crate::sys::stamp::Stamp;

/// The file, in the publisher's state directory.
pub const FILE: &str = "status-files";
/// The file's first bytes; a file without them (torn, foreign) is no memo at all.
const MAGIC: &[u8] = b"bento status files 1\n";
/// What one host's file may take in the memo: a larger one (a host padding its heartbeat)
/// is read every run, so the memo stays about a kilobyte per host.
pub const MAX_KEPT: usize = 16 * 1024;

/// The files of a host that are remembered. The heartbeat changes at every poll: status
/// run every few seconds (by hand during a rollout, `--watch`) finds most unchanged; run
/// less often than hosts poll, it finds them all changed, reads them as it would without a
/// memo (a stat more each) and rewrites the memo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Current = 0,
    Latest = 1,
    Heartbeat = 2,
}
const SLOTS: usize = 3;

/// One remembered file: its stamp and where its bytes are in the loaded memo.
type Known = [Option<(Stamp, Range<usize>)>; SLOTS];

/// What a run keeps of one host: for each slot, the stamp and the bytes.
type HostKept = (HostName, [Option<(Stamp, Kept)>; SLOTS]);

/// What a run keeps of one file: bytes of the loaded memo (unchanged) or bytes it read.
enum Kept {
    Again(Range<usize>),
    Read(Vec<u8>),
}

/// The memo loaded at the start of a run, and what the run keeps for the next one.
#[derive(Default)]
pub struct Memo {
    /// Where it is kept; `None`: nothing is remembered (a few hosts polled by `--wait`).
    path: Option<PathBuf>,
    /// The real clock when the run began, for [`Stamp::settled`].
    now: Option<SystemTime>,
    bytes: Vec<u8>,
    /// Each host's name (where it is in `bytes`) and files, sorted by name: no allocation
    /// per host to load (a 10,000-host memo is read by every status run).
    known: Vec<(Range<usize>, Known)>,
    kept: Mutex<Vec<HostKept>>,
    /// Files remembered in `known`.
    known_files: usize,
    /// Files this run read and kept, remembered files of the hosts it visited, and those
    /// of them it did not keep (changed, gone or unsettled).
    read: AtomicUsize,
    visited_files: AtomicUsize,
    forgotten: AtomicUsize,
}

/// One host's part of a run: what it found remembered and what it keeps.
pub struct HostMemo<'a> {
    memo: &'a Memo,
    host: &'a HostName,
    known: Option<&'a Known>,
    /// The stamps [`HostMemo::get`] took.
    stamps: [Option<Stamp>; SLOTS],
    kept: [Option<(Stamp, Kept)>; SLOTS],
}

impl Memo {
    /// The memo kept at `path` (empty when missing, unreadable, torn or foreign), for a run
    /// at `now` by the real clock.
    pub fn load(path: PathBuf, now: SystemTime) -> Self {
        let bytes = std::fs::read(&path).unwrap_or_default();
        let known = parse(&bytes).unwrap_or_default();
        let known_files = known.iter().flat_map(|(_, k)| k).flatten().count();
        Self {
            path: Some(path),
            now: Some(now),
            bytes,
            known,
            known_files,
            ..Self::default()
        }
    }

    /// Whether files are stamped and remembered at all.
    pub fn active(&self) -> bool {
        self.path.is_some()
    }

    /// `host`'s part of this run.
    pub fn host<'a>(&'a self, host: &'a HostName) -> HostMemo<'a> {
        HostMemo {
            memo: self,
            host,
            known: self.find(host),
            stamps: [None; SLOTS],
            kept: Default::default(),
        }
    }

    fn find(&self, host: &HostName) -> Option<&Known> {
        let name = host.as_str().as_bytes();
        let at = self
            .known
            .binary_search_by(|(n, _)| self.bytes[n.clone()].cmp(name))
            .ok()?;
        Some(&self.known[at].1)
    }

    /// Writes what this run kept, once it differs enough from what was loaded: a sixteenth
    /// of the files (at least one) read anew or forgotten. Rewriting the whole memo for a
    /// few changed files would cost a busy fleet's every run (`--watch` redraws at each
    /// report) a write of a kilobyte per host; until then those few are read each run.
    /// `complete`: the run looked at every host, so the hosts it did not keep are gone;
    /// otherwise they are kept as they were. Not synced: a crash can only cost the memo
    /// (bytes no run wrote are never used, see [`HostMemo::get`]). A publisher state this
    /// user may not write only means no memo.
    pub fn save(&self, complete: bool) {
        let Some(path) = &self.path else { return };
        let mut forgotten = self.forgotten.load(Ordering::Relaxed);
        if complete {
            // The hosts it did not visit are gone.
            forgotten +=
                (self.known_files).saturating_sub(self.visited_files.load(Ordering::Relaxed));
        }
        let changed = self.read.load(Ordering::Relaxed) + forgotten;
        if changed == 0
            || changed < self.known_files / 16
            || !path.parent().is_some_and(Path::is_dir)
        {
            return;
        }
        let mut kept = std::mem::take(&mut *self.kept.lock().expect("memo lock"));
        if !complete {
            // A host this run kept nothing of was still visited: its old entries must not
            // come back. The others are kept as they were.
            let visited: HashSet<&HostName> = kept.iter().map(|(h, _)| h).collect();
            let mut unvisited = Vec::new();
            for (name, known) in &self.known {
                let name = std::str::from_utf8(&self.bytes[name.clone()]).ok();
                let Some(host) = name.and_then(|n| HostName::new(n).ok()) else {
                    continue;
                };
                if !visited.contains(&host) {
                    let again = known
                        .clone()
                        .map(|k| k.map(|(stamp, at)| (stamp, Kept::Again(at))));
                    unvisited.push((host, again));
                }
            }
            kept.extend(unvisited);
        }
        kept.sort_by(|a, b| a.0.cmp(&b.0));
        if let Err(e) = crate::sys::atomic::replace_unsynced(path, &self.to_bytes(&kept), 0o600) {
            tracing::debug!("{}: not written: {e}", path.display());
        }
    }

    fn to_bytes(&self, kept: &[HostKept]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for (host, slots) in kept {
            if slots.iter().all(Option::is_none) {
                continue;
            }
            let name = host.as_str().as_bytes();
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name);
            for slot in slots {
                let Some((stamp, kept)) = slot else {
                    out.push(0);
                    continue;
                };
                let bytes = match kept {
                    Kept::Again(at) => &self.bytes[at.clone()],
                    Kept::Read(b) => b.as_slice(),
                };
                out.push(1);
                stamp.write(&mut out);
                out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(bytes);
            }
        }
        out
    }
}

impl HostMemo<'_> {
    /// The bytes remembered for `slot`, when its file's stamp (`now`, asked only when
    /// something is remembered) is still the one they were read under; they are then
    /// kept for the next run as they are. Bytes no run wrote (empty, or holding a NUL, as
    /// a crash can leave a file written without a sync) are not used: the file is read.
    pub fn get(&mut self, slot: Slot, now: impl FnOnce() -> Option<Stamp>) -> Option<&[u8]> {
        let i = slot as usize;
        let (stamp, at) = self.known?[i].as_ref()?;
        let now = now()?;
        self.stamps[i] = Some(now);
        let bytes = &self.memo.bytes[at.clone()];
        if *stamp != now || bytes.is_empty() || memchr::memchr(0, bytes).is_some() {
            return None;
        }
        self.kept[i] = Some((now, Kept::Again(at.clone())));
        Some(bytes)
    }

    /// Whether files are stamped and remembered at all.
    pub fn active(&self) -> bool {
        self.memo.active()
    }

    /// The stamp [`HostMemo::get`] took of `slot`'s file, if it took one.
    pub fn stamped(&self, slot: Slot) -> Option<Stamp> {
        self.stamps[slot as usize]
    }

    /// Remembers `bytes` as what `slot`'s file gave when read, `stamp` being the file's
    /// stamp before the read (so a write during it leaves another stamp), once its last
    /// change is settled; `bytes` is only made when it will be kept.
    pub fn keep(&mut self, slot: Slot, stamp: Option<Stamp>, bytes: impl FnOnce() -> Vec<u8>) {
        let i = slot as usize;
        let (Some(stamp), Some(now)) = (stamp, self.memo.now) else {
            return;
        };
        if !stamp.settled(now) || self.kept[i].is_some() {
            return;
        }
        let bytes = bytes();
        if bytes.len() <= MAX_KEPT {
            self.kept[i] = Some((stamp, Kept::Read(bytes)));
        }
    }
}

impl Drop for HostMemo<'_> {
    /// Hands the host's part to the memo, once, at the end of its row.
    fn drop(&mut self) {
        if !self.memo.active() {
            return;
        }
        let kept = std::mem::take(&mut self.kept);
        let known = |i: usize| self.known.is_some_and(|k| k[i].is_some());
        let read = kept
            .iter()
            .filter(|k| matches!(k, Some((_, Kept::Read(_)))))
            .count();
        let forgotten = (0..SLOTS)
            .filter(|&i| known(i) && kept[i].is_none())
            .count();
        let visited = (0..SLOTS).filter(|&i| known(i)).count();
        self.memo.read.fetch_add(read, Ordering::Relaxed);
        self.memo
            .visited_files
            .fetch_add(visited, Ordering::Relaxed);
        self.memo.forgotten.fetch_add(forgotten, Ordering::Relaxed);
        self.memo
            .kept
            .lock()
            .expect("memo lock")
            .push((self.host.clone(), kept));
    }
}

/// What is remembered of a host's newest report: all of it but the log tail and the
/// checks' results, which status never reads (they are most of a report's bytes).
pub fn for_status(report: &Report) -> Vec<u8> {
    let report = Report {
        log_tail: String::new(),
        checks: Vec::new(),
        ..report.clone()
    };
    serde_json::to_vec(&report).expect("a report serialises")
}

/// The records of a whole memo file; `None` for a torn or foreign one.
fn parse(bytes: &[u8]) -> Option<Vec<(Range<usize>, Known)>> {
    let mut r = Reader::after(bytes, MAGIC)?;
    let at = |r: &Reader<'_>| bytes.len() - r.remaining();
    let mut out: Vec<(Range<usize>, Known)> = Vec::new();
    while !r.is_empty() {
        let len = usize::from(r.u16()?);
        let name = at(&r)..at(&r) + len;
        r.bytes(len)?;
        // Written sorted; anything else is not a memo this code wrote.
        if out
            .last()
            .is_some_and(|(last, _)| bytes[last.clone()] >= bytes[name.clone()])
        {
            return None;
        }
        let mut known: Known = Default::default();
        for slot in &mut known {
            if r.take::<1>()?[0] == 0 {
                continue;
            }
            let stamp = Stamp::read(&mut r)?;
            let len = r.u32()? as usize;
            let start = at(&r);
            r.bytes(len)?;
            *slot = Some((stamp, start..start + len));
        }
        out.push((name, known));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn host(n: &str) -> HostName {
        HostName::new(n).unwrap()
    }

    fn stamp(n: i64) -> Stamp {
        Stamp {
            dev: 1,
            ino: 7,
            size: 3,
            mtime_ns: n,
            ctime_ns: n,
        }
    }

    /// A run at `now` (ns since the epoch) of `hosts`, each with its stamps now, keeping
    /// what `read` says was read of each slot that was not remembered; returns what it found.
    fn run(
        path: &Path,
        now: i64,
        hosts: &[(&str, [Option<Stamp>; 3])],
        read: &str,
        complete: bool,
    ) -> Vec<[Option<Vec<u8>>; 3]> {
        let memo = Memo::load(
            path.to_owned(),
            SystemTime::UNIX_EPOCH + Duration::from_nanos(now as u64),
        );
        let names: Vec<HostName> = hosts.iter().map(|(h, _)| host(h)).collect();
        let mut found = Vec::new();
        for (name, (_, stamps)) in names.iter().zip(hosts) {
            let mut h = memo.host(name);
            let got = [Slot::Current, Slot::Latest, Slot::Heartbeat].map(|slot| {
                let stamp = stamps[slot as usize];
                let got = h.get(slot, || stamp).map(<[u8]>::to_vec);
                if got.is_none() {
                    h.keep(slot, stamp, || format!("{read} {name}").into_bytes());
                }
                got
            });
            found.push(got);
        }
        memo.save(complete);
        found
    }

    const SETTLED: i64 = 10_000_000_000;

    #[test]
    fn an_unchanged_settled_file_is_remembered_and_anything_else_is_read() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(FILE);
        let all = |s: Stamp| [Some(s), Some(s), Some(s)];
        // First run: nothing remembered; files changed just now are not kept.
        let first = run(&path, 1, &[("a", all(stamp(0)))], "one", true);
        assert_eq!(first, vec![[None, None, None]]);
        assert!(!path.exists(), "nothing settled: nothing to write");
        // Settled: kept, and found by the next run.
        run(&path, SETTLED, &[("a", all(stamp(0)))], "one", true);
        let again = run(&path, SETTLED, &[("a", all(stamp(0)))], "two", true);
        assert_eq!(again, vec![[0, 1, 2].map(|_| Some(b"one a".to_vec()))]);
        // An unchanged run leaves the file as it is.
        let untouched = SystemTime::UNIX_EPOCH;
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(untouched)
            .unwrap();
        run(&path, SETTLED, &[("a", all(stamp(0)))], "two", true);
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert_eq!(mtime, untouched);
        // One file changed (another stamp): only that one is read again.
        let changed = [Some(stamp(0)), Some(stamp(5)), Some(stamp(0))];
        let found = run(&path, SETTLED, &[("a", changed)], "three", true);
        assert_eq!(found[0][1], None);
        let found = run(&path, SETTLED, &[("a", changed)], "four", true);
        assert_eq!(found[0][1].as_deref(), Some(b"three a".as_slice()));
        assert_eq!(found[0][0].as_deref(), Some(b"one a".as_slice()));
        // A file that is gone (no stamp) is forgotten.
        let gone = [Some(stamp(0)), None, Some(stamp(0))];
        run(&path, SETTLED, &[("a", gone)], "five", true);
        let found = run(&path, SETTLED, &[("a", changed)], "six", true);
        assert_eq!(found[0][1], None);
    }

    #[test]
    fn a_run_over_some_hosts_keeps_the_others_and_a_run_over_all_drops_the_gone() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(FILE);
        let all = [Some(stamp(0)), Some(stamp(0)), Some(stamp(0))];
        run(&path, SETTLED, &[("a", all), ("b", all)], "one", true);
        // `--host b`: a is not looked at, and still remembered after.
        run(&path, SETTLED, &[("b", [None, None, None])], "two", false);
        let found = run(&path, SETTLED, &[("a", all), ("b", all)], "three", true);
        assert_eq!(found[0][0].as_deref(), Some(b"one a".as_slice()));
        assert_eq!(found[1][0], None, "b's files were gone");
        // Every host looked at and a gone: a is forgotten.
        run(&path, SETTLED, &[("b", all)], "four", true);
        let found = run(&path, SETTLED, &[("a", all), ("b", all)], "five", true);
        assert_eq!(found[0][0], None);
        assert_eq!(found[1][0].as_deref(), Some(b"three b".as_slice()));
    }

    #[test]
    fn a_few_changes_are_not_written_until_a_sixteenth_of_the_files_changed() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(FILE);
        let all = [Some(stamp(0)), Some(stamp(0)), Some(stamp(0))];
        let names: Vec<String> = (0..20).map(|n| format!("h{n:02}")).collect();
        let fleet = |changed: usize| -> Vec<(&str, [Option<Stamp>; 3])> {
            let one = [Some(stamp(0)), Some(stamp(1)), Some(stamp(0))];
            (names.iter().enumerate())
                .map(|(i, n)| (n.as_str(), if i < changed { one } else { all }))
                .collect()
        };
        run(&path, SETTLED, &fleet(0), "one", true);
        // 60 files remembered: 2 changed is under a sixteenth, so still "one" after.
        run(&path, SETTLED, &fleet(2), "two", true);
        let found = run(&path, SETTLED, &fleet(2), "three", true);
        assert_eq!(found[0][1], None, "not remembered: read again");
        assert_eq!(found[2][1].as_deref(), Some(b"one h02".as_slice()));
        // 4 changed: written.
        run(&path, SETTLED, &fleet(4), "four", true);
        let found = run(&path, SETTLED, &fleet(4), "five", true);
        assert_eq!(found[0][1].as_deref(), Some(b"four h00".as_slice()));
    }

    #[test]
    fn a_large_file_bytes_no_run_wrote_a_torn_memo_and_an_inactive_memo_remember_nothing() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(FILE);
        let later = || SystemTime::now() + Duration::from_secs(60);
        let memo = Memo::load(path.clone(), later());
        let name = host("a");
        let now = Some(Stamp::of(&std::fs::metadata(t.path()).unwrap()));
        let mut h = memo.host(&name);
        h.keep(Slot::Current, now, || b"small".to_vec());
        h.keep(Slot::Latest, now, || vec![b'x'; MAX_KEPT + 1]);
        drop(h);
        memo.save(true);
        let memo = Memo::load(path.clone(), later());
        let mut h = memo.host(&name);
        assert_eq!(h.get(Slot::Current, || now), Some(b"small".as_slice()));
        assert_eq!(h.get(Slot::Latest, || now), None, "too large to keep");
        drop(h);
        let other = host("b");
        let mut h = memo.host(&other);
        h.keep(Slot::Latest, now, || b"{\"a\":\"\0\"}".to_vec());
        drop(h);
        memo.save(false);
        let memo = Memo::load(path.clone(), later());
        let mut h = memo.host(&other);
        assert_eq!(
            h.get(Slot::Latest, || now),
            None,
            "a NUL: not what a run wrote"
        );
        drop(h);

        let bytes = std::fs::read(&path).unwrap();
        for bad in [
            &bytes[..bytes.len() - 1],
            b"bento status files 0\n".as_slice(),
        ] {
            std::fs::write(&path, bad).unwrap();
            let memo = Memo::load(path.clone(), later());
            assert_eq!(memo.host(&name).get(Slot::Current, || now), None);
        }
        let inactive = Memo::default();
        assert!(!inactive.active());
        let mut h = inactive.host(&name);
        assert_eq!(
            h.get(Slot::Current, || panic!("nothing to stamp for")),
            None
        );
        h.keep(Slot::Current, now, || {
            panic!("an inactive memo keeps nothing")
        });
    }
}
