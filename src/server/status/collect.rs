//! Gathering the facts of every host from the chroot: the live manifest's head (server
//! state), the build record, and the host's `logs/heartbeat.json` and `logs/latest.json`
//! (host-written, read only through `server::logs`). Nothing else of `logs/` is opened, and
//! it is listed only when those reads do not say when the files came, so the cost per host
//! is four small files whatever the length of its history; over a chroot, each of
//! `current` and the two `logs/` files is one stat when unchanged since the last run
//! (`memo`).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use rayon::prelude::*;
use serde::Serialize;

use super::hostlogs::{read_log, read_logs, store_path, Notes, Received};
use super::state::{self, Assessment, Facts, Published, State};
use crate::nix::StorePath;
use crate::protocol::layout::{self, Chroot};
use crate::protocol::manifest::{Digest, Manifest};
use crate::protocol::report::{Heartbeat, Outcome, Report, HEARTBEAT_FILE, LATEST_FILE};
use crate::protocol::HostName;
use crate::server::build::record;
use crate::server::chroot;
use crate::server::store::{HostReader, Key, Store, StoreError};
use crate::sys::terminal;

/// Where a host's expected system comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExpectedFrom {
    /// The live manifest's `system` (`bento publish --build`).
    Manifest,
    /// `bento build`'s record, built from the same configuration as the live version.
    Build,
}

/// One host's row: the facts and the state they add up to. Serialised as `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    pub host: HostName,
    pub state: State,
    /// The live version (manifest digest).
    pub published: Option<Digest>,
    /// When it was published (RFC 3339).
    pub published_at: Option<String>,
    pub expected_system: Option<StorePath>,
    pub expected_from: Option<ExpectedFrom>,
    /// What the host says it runs (from its heartbeat, else its newest report).
    pub running_system: Option<String>,
    pub running_version: Option<Digest>,
    /// The newest heartbeat or report (RFC 3339).
    pub last_seen: Option<String>,
    /// When the newest report was a success, its time (older reports are not read).
    pub last_success: Option<String>,
    /// Why the host is in a problem state, and anything of its logs that could not be read.
    pub error: Option<String>,
    /// Its heartbeat says the applied system waits for a reboot (new kernel or initrd).
    pub reboot_pending: bool,
    /// Its heartbeat says whether its agent checks manifest signatures; `None` when it does
    /// not say (no heartbeat, or an agent older than the field).
    pub verifies_signatures: Option<bool>,
    /// The host's clock minus the server's, in seconds (its newest stamp against when the
    /// server received that file); `None` when not known.
    pub clock_skew_s: Option<i64>,
    /// The server's clock minus the host's, in seconds, as its agent corrected its requests'
    /// time by it (an object store's `Date`), from its heartbeat or newest report; `None`
    /// when it corrected nothing. Shown beside the skew.
    pub clock_offset_s: Option<i64>,
    /// The manifest formats its agent reads, from its heartbeat (`[1]` for an agent older
    /// than the field); `None` without a heartbeat. A host without 2 holds a fleet back
    /// from `[server] format = 2`.
    pub formats: Option<Vec<u32>>,
    /// Some of the files the state depends on could not be read (permissions, I/O errors:
    /// named in `error`), so the state is a guess; `bento status` then exits non-zero.
    pub unreadable: bool,
    #[serde(skip)]
    pub last_seen_at: Option<SystemTime>,
    #[serde(skip)]
    pub last_success_at: Option<SystemTime>,
    #[serde(skip)]
    pub published_time: Option<SystemTime>,
}

/// What to look at.
pub struct Query<'a> {
    /// Where the versions and the hosts' reports are.
    pub store: &'a dyn Store,
    /// The chroot of the publisher's state (build records) and of retired hosts.
    pub chroot: &'a Chroot,
    /// Hosts named in bento.toml (listed even when nothing is published for them yet), with
    /// their polling intervals.
    pub intervals: &'a BTreeMap<HostName, Duration>,
    pub default_interval: Duration,
    /// Only these hosts (all when empty).
    pub only: &'a [HostName],
    pub now: SystemTime,
}

use super::heads::{Head, Heads, FILE as HEADS_FILE};
use super::memo::{self, HostMemo, Memo, Slot, FILE as MEMO_FILE};

/// Threads reading host files at once (see `collect`).
const COLLECT_THREADS: usize = 32;

/// How a host came to be listed (see [`host_names`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listed {
    /// bento.toml names it.
    Named,
    /// Asked for by name, bento.toml does not name it.
    AskedFor,
    /// Only its directory in the chroot: shown unless it is sealed (retired).
    Found,
}

/// Every host in bento.toml, and every other host with a directory in the chroot unless
/// `bento server sync-accounts --prune` retired it (sealed to root: no host logs in there
/// any more) and it was not asked for by name; sorted by name. Whether a `Found` host is
/// sealed is for the caller to check (a stat per host, worth doing in parallel).
fn host_names(query: &Query<'_>) -> std::io::Result<Vec<(HostName, Listed)>> {
    let mut names: BTreeMap<HostName, Listed> = query
        .intervals
        .keys()
        .map(|name| (name.clone(), Listed::Named))
        .collect();
    match std::fs::read_dir(&query.chroot.root) {
        Ok(rd) => {
            for entry in rd {
                let entry = entry?;
                let name = entry.file_name();
                // `.bento`, temporaries and anything else that is not a host name are skipped.
                let Some(host) = name.to_str().and_then(|n| HostName::new(n).ok()) else {
                    continue;
                };
                if !entry.file_type()?.is_dir() || names.contains_key(&host) {
                    continue;
                }
                let listed = if query.only.contains(&host) {
                    Listed::AskedFor
                } else {
                    Listed::Found
                };
                names.insert(host, listed);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if !query.only.is_empty() {
        names.retain(|n, _| query.only.contains(n));
    }
    Ok(names.into_iter().collect())
}

/// The status of every host (in parallel), sorted problems first, then by name.
pub fn collect(query: &Query<'_>) -> std::io::Result<Vec<HostStatus>> {
    // The memos are read while the chroot is listed: each is a few milliseconds of a
    // 10,000-host run, spent waiting for nothing else.
    let state = query.chroot.state_dir();
    let (names, heads, memo) = std::thread::scope(|s| {
        let heads = s.spawn(|| Heads::load(state.join(HEADS_FILE)));
        // The real clock, not `query.now`: the memo judges files' own times.
        let memo = s.spawn(|| Memo::load(state.join(MEMO_FILE), SystemTime::now()));
        let names = host_names(query);
        (names, join(heads), join(memo))
    });
    let names = names?;
    let run = || -> std::io::Result<Vec<HostStatus>> {
        // Indexed, so every thread writes its rows into one vector sized up front: gathered
        // per thread instead, the rows' growing vectors were left in as many allocator
        // arenas, and peak memory varied by 20 MiB from run to run.
        let rows: Vec<Option<std::io::Result<HostStatus>>> = names
            .par_iter()
            .map(|(host, listed)| {
                // One more stat, for hosts bento.toml no longer names only.
                let sealed = match listed {
                    Listed::Found => match std::fs::symlink_metadata(query.chroot.host_dir(host)) {
                        Ok(meta) if chroot::is_sealed(&meta) => return None,
                        Ok(_) => Some(false),
                        Err(e) => return Some(Err(e)),
                    },
                    Listed::Named | Listed::AskedFor => None,
                };
                let interval = query
                    .intervals
                    .get(host)
                    .copied()
                    .unwrap_or(query.default_interval);
                let mut row = host_status(
                    query.store,
                    query.chroot,
                    &heads,
                    &memo,
                    host,
                    query.now,
                    interval,
                );
                if *listed != Listed::Named {
                    note_removed(&mut row, query.chroot, sealed);
                }
                Some(Ok(row))
            })
            .collect();
        rows.into_iter().flatten().collect()
    };
    // Reading four small files per host is I/O-bound when they are not cached: many reads in
    // flight at once cut a cold 10,000-host run from about 8 s to 2 s on two cores.
    let threads = COLLECT_THREADS.min(names.len().max(1));
    let mut rows = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(pool) => pool.install(run),
        Err(_) => run(),
    }?;
    heads.save(rows.iter().filter_map(|r| r.published));
    memo.save(query.only.is_empty());
    sort(&mut rows);
    Ok(rows)
}

/// A scoped thread's result; its panic goes on in the caller.
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Says in the row of a host bento.toml does not name what became of it: retired by
/// `sync-accounts --prune` (listed only when asked for), or still able to log in.
/// `sealed`: what `collect` found, when it looked.
fn note_removed(row: &mut HostStatus, chroot: &Chroot, sealed: Option<bool>) {
    let sealed = sealed.unwrap_or_else(|| {
        std::fs::symlink_metadata(chroot.host_dir(&row.host)).is_ok_and(|m| chroot::is_sealed(&m))
    });
    let note = if sealed {
        "not in bento.toml: retired (its directory is root-only)"
    } else {
        "not in bento.toml (`bento server sync-accounts --prune` retires it)"
    };
    row.error = Some(match row.error.take() {
        Some(e) => format!("{e}; {note}"),
        None => note.to_owned(),
    });
}

/// Problems first (failing, rolled back, silent, drifted, pending, new, up to date).
pub fn sort(rows: &mut [HostStatus]) {
    // By key, then each row moved once: a row is large, and a merge sort moving every row
    // at every pass took a 10,000-host run 12 ms.
    rows.sort_by_cached_key(|r| (r.state, r.host.clone()));
}

/// The live version's digest and manifest head; `None` when nothing is published.
fn live(
    reader: &HostReader<'_>,
    heads: &Heads,
    memo: &mut HostMemo<'_>,
    notes: &mut Notes,
) -> Option<(Digest, Head)> {
    let stamp = || reader.stamp(&Key::Current);
    let mut stamped = None;
    let read = match memo.get(Slot::Current, stamp) {
        Some(b) => Ok(Some(b.to_vec())),
        None => {
            // Stamped before it is read: a switch during the read leaves another stamp.
            stamped = memo.stamped(Slot::Current);
            if stamped.is_none() && memo.active() {
                stamped = stamp();
            }
            reader.get(&Key::Current, 4096)
        }
    };
    let bytes = match read {
        Ok(Some(b)) => b,
        Ok(None) => return None,
        Err(e @ StoreError::TooLarge { .. }) => {
            notes.push(format!("current: {e}"));
            return None;
        }
        Err(e) => {
            notes.unreadable(e.to_string());
            return None;
        }
    };
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            notes.push(format!("current: {e}"));
            return None;
        }
    };
    let digest = match layout::parse_current(&text) {
        Ok(d) => d,
        Err(e) => {
            notes.push(format!("current: {e}"));
            return None;
        }
    };
    memo.keep(Slot::Current, stamped, || text.into_bytes());
    // The manifest is the server's own, written by publish: its digest is not re-hashed
    // here (hashing every manifest of a large fleet would dominate the run).
    let key = Key::Manifest(digest);
    let head = heads.get(&digest, || read_head(reader, &key));
    match head {
        Ok(h) if crate::protocol::manifest::FORMATS.contains(&h.format) => Some((digest, h)),
        Ok(h) => {
            notes.push(format!(
                "{}: manifest format {}",
                reader.store().locate(reader.host(), &key).display(),
                h.format
            ));
            None
        }
        Err(HeadError::Store(e)) => {
            notes.unreadable(e.to_string());
            None
        }
        Err(HeadError::Parse(e)) => {
            notes.push(format!("manifests/{digest}.json: {e}"));
            None
        }
    }
}

/// Why a manifest's head is not there: the file could not be read, or it is not one.
#[derive(Debug)]
enum HeadError {
    Store(StoreError),
    Parse(serde_json::Error),
}

/// Where the head fields end in a canonical manifest. The sequence cannot occur inside a
/// JSON string (a quote there is always escaped), so its first occurrence is structural.
const CONFIG_KEY: &[u8] = b",\"config\":";

/// Reads a manifest's head. Canonical manifests list `format`, `host`, `created`,
/// `source_commit`, `build` and `system` before `config` (docs/protocol.md), so only the
/// bytes before `,"config":` are parsed: a fleet's manifests can hold thousands of entries
/// each, and skimming them all would dominate `bento status`. Anything else is parsed whole.
fn read_head(reader: &HostReader<'_>, key: &Key) -> Result<Head, HeadError> {
    let missing = || {
        HeadError::Store(StoreError::Io {
            at: reader.store().locate(reader.host(), key),
            source: std::io::ErrorKind::NotFound.into(),
        })
    };
    // Most heads end in the first 4 KiB; none of a canonical manifest after 64 KiB.
    for len in [4096, 64 * 1024] {
        let buf = reader
            .get_prefix(key, len)
            .map_err(HeadError::Store)?
            .ok_or_else(missing)?;
        if let Some(at) = buf.windows(CONFIG_KEY.len()).position(|w| w == CONFIG_KEY) {
            let mut head = buf[..at].to_vec();
            head.push(b'}');
            if let Ok(h) = serde_json::from_slice::<Head>(&head) {
                return Ok(h);
            }
            break;
        }
        if (buf.len() as u64) < len {
            // The whole file, and no canonical head in it.
            return serde_json::from_slice::<Head>(&buf).map_err(HeadError::Parse);
        }
    }
    let bytes = reader
        .get(key, crate::protocol::manifest::MAX_MANIFEST_BYTES)
        .map_err(HeadError::Store)?
        .ok_or_else(missing)?;
    serde_json::from_slice::<Head>(&bytes).map_err(HeadError::Parse)
}

/// The build record's system, when it was built from the live version's configuration.
fn built_for(
    reader: &HostReader<'_>,
    chroot: &Chroot,
    digest: &Digest,
    notes: &mut Notes,
) -> Option<StorePath> {
    let (store, host) = (reader.store(), reader.host());
    let rec = match record::read(chroot, host) {
        Ok(Some(r)) => r,
        Ok(None) => return None,
        Err(e @ record::RecordError::Io { .. }) => {
            notes.unreadable(e.to_string());
            return None;
        }
        Err(e) => {
            notes.push(e.to_string());
            return None;
        }
    };
    let bytes = reader
        .get(
            &Key::Manifest(*digest),
            crate::protocol::manifest::MAX_MANIFEST_BYTES,
        )
        .ok()??;
    let mut manifest = Manifest::parse(&bytes).ok()?;
    crate::server::store::trees::expand(store, host, &mut manifest).ok()?;
    (record::content_key(manifest.build, &manifest.config) == rec.key)
        .then_some(rec.system)
        .flatten()
}

/// The status of one host at `now`.
pub fn host_status(
    store: &dyn Store,
    chroot: &Chroot,
    heads: &Heads,
    memo: &Memo,
    host: &HostName,
    now: SystemTime,
    interval: Duration,
) -> HostStatus {
    let mut notes = Notes::default();
    let reader = HostReader::new(store, host);
    let mut memo = memo.host(host);
    let live = live(&reader, heads, &mut memo, &mut notes);
    // No `is_dir` first: a host without a directory (named in bento.toml, never published)
    // makes both reads a quiet `NotFound`, and each stat counts on 10,000 hosts.
    let mut received = Received::default();
    let [(heartbeat, heartbeat_stamp), (latest, latest_stamp)] = read_logs(&reader, &mut memo);
    let heartbeat: Option<Heartbeat> = read_log(
        heartbeat,
        HEARTBEAT_FILE,
        Heartbeat::parse,
        &mut notes,
        &mut received,
    );
    if let Some(h) = &heartbeat {
        memo.keep(Slot::Heartbeat, heartbeat_stamp, || h.to_bytes());
    }
    let latest: Option<Report> = read_log(
        latest,
        LATEST_FILE,
        Report::parse,
        &mut notes,
        &mut received,
    );
    if let Some(r) = &latest {
        memo.keep(Slot::Latest, latest_stamp, || memo::for_status(r));
    }
    drop(memo);
    // A host may only speak for itself.
    let heartbeat = heartbeat.filter(|h| {
        let ok = &h.host == host;
        if !ok {
            notes.refused(format!("logs/{HEARTBEAT_FILE} is for host {}", h.host));
        }
        ok
    });
    let latest = latest.filter(|r| {
        let ok = &r.host == host;
        if !ok {
            notes.refused(format!("logs/{LATEST_FILE} is for host {}", r.host));
        }
        ok
    });
    // Host-written fields with a type are checked here, once: a "system" that is not a
    // store path is a note, never a value shown or compared.
    let heartbeat = heartbeat.map(|mut h| {
        store_path(&mut h.system, HEARTBEAT_FILE, "system", &mut notes);
        h
    });
    let latest = latest.map(|mut r| {
        for (value, field) in [
            (&mut r.system_before, "system_before"),
            (&mut r.system_after, "system_after"),
            (&mut r.built_system, "built_system"),
        ] {
            store_path(value, LATEST_FILE, field, &mut notes);
        }
        r
    });

    let (expected, expected_from) = match &live {
        Some((
            _,
            Head {
                system: Some(s), ..
            },
        )) => (Some(s.clone()), Some(ExpectedFrom::Manifest)),
        Some((digest, _)) => match built_for(&reader, chroot, digest, &mut notes) {
            Some(s) => (Some(s), Some(ExpectedFrom::Build)),
            None => (None, None),
        },
        None => (None, None),
    };
    let published_time = live
        .as_ref()
        .and_then(|(_, h)| state::parse_time(&h.created));
    let facts = Facts {
        published: live.as_ref().map(|(d, _)| Published {
            digest: *d,
            created: published_time.unwrap_or(SystemTime::UNIX_EPOCH),
        }),
        expected: expected.as_ref(),
        heartbeat: heartbeat.as_ref(),
        latest: latest.as_ref(),
    };
    // Issue #24 item 6: liveness by when the server received the files (its clock), and
    // the host's own stamps compared with that: the clock skew.
    let received = received.resolve(store, host);
    let clock_skew_s = super::skew::skew(&facts, received);
    let Assessment { state, reason } = state::assess_received(&facts, now, interval, received);
    let last_seen_at = received.or_else(|| state::last_seen(&facts));
    // The heartbeat is every run's: a run that corrected nothing clears an older report's.
    let clock_offset_s = match &heartbeat {
        Some(h) => h.clock_offset_s,
        None => latest.as_ref().and_then(|r| r.clock_offset_s),
    };
    if let Some(note) = clock_offset_s.map(super::skew::offset_note) {
        notes.list.insert(0, note);
    }
    if let Some(note) = clock_skew_s.and_then(super::skew::note) {
        notes.list.insert(0, note);
    }
    let formats = heartbeat.as_ref().map(|h| match h.formats.is_empty() {
        true => vec![crate::protocol::manifest::FORMAT],
        false => h.formats.clone(),
    });
    // A format-2 version its agent cannot read: the host refuses every version until its
    // bento is upgraded (docs/protocol.md, "Upgrading").
    let live_format = live.as_ref().map(|(_, h)| h.format);
    if let (Some(f), Some(reads)) = (live_format, &formats) {
        if !reads.contains(&f) {
            notes.list.push(format!(
                "its agent reads manifest format {} only, and this version is format {f}: upgrade bento on it",
                reads.iter().map(u32::to_string).collect::<Vec<_>>().join(" and ")
            ));
        }
    }
    // The heartbeat remembers the last success even when newer runs failed.
    let last_success_at = heartbeat
        .as_ref()
        .and_then(|h| h.last_success.as_ref())
        .map(crate::protocol::Timestamp::system_time)
        .or_else(|| {
            latest
                .as_ref()
                .filter(|r| r.outcome == Outcome::Success)
                .map(|r| r.finished.system_time())
        });
    let unreadable = notes.unreadable;
    // A state worked out from part of a host's files (usually `new`) would lie; so would
    // `new` for a host that did write, but only files that were refused.
    let all_refused = notes.refused && heartbeat.is_none() && latest.is_none();
    let state = if unreadable || all_refused {
        State::Unknown
    } else {
        state
    };
    // Escaped once, here, where host-written text (report errors, parse errors quoting
    // field names) enters the row: every printer of a row (the status table, the
    // `--wait` and rollout lines, a halt reason) then shows it, never sends it.
    let error = terminal::escape(
        &reason
            .into_iter()
            .chain(notes.list)
            .collect::<Vec<_>>()
            .join("; "),
    )
    .into_owned();
    let fmt = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    HostStatus {
        host: host.clone(),
        state,
        published: live.as_ref().map(|(d, _)| *d),
        published_at: live.as_ref().map(|(_, h)| h.created.clone()),
        expected_system: expected,
        expected_from,
        running_system: heartbeat
            .as_ref()
            .and_then(|h| h.system.clone())
            .or_else(|| latest.as_ref().and_then(|r| r.system_after.clone())),
        running_version: heartbeat.as_ref().and_then(|h| h.version),
        last_seen: last_seen_at.map(fmt),
        last_success: last_success_at.map(fmt),
        error: (!error.is_empty()).then_some(error),
        reboot_pending: heartbeat.as_ref().is_some_and(|h| h.reboot_pending),
        verifies_signatures: heartbeat.as_ref().and_then(|h| h.verifies_signatures),
        clock_skew_s,
        clock_offset_s,
        formats,
        unreadable,
        last_seen_at,
        last_success_at,
        published_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alpha() -> HostName {
        HostName::new("alpha").unwrap()
    }

    /// A chroot with host `alpha`: a live version and, if given, its heartbeat's JSON.
    fn chroot_with(heartbeat: Option<serde_json::Value>) -> (tempfile::TempDir, Chroot) {
        let tmp = tempfile::tempdir().unwrap();
        let chroot = Chroot::new(tmp.path().join("chroot"));
        let dir = chroot.host_dir(&alpha());
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let digest = Digest::of(b"m");
        std::fs::write(
            layout::manifest(&dir, &digest),
            r#"{"format":1,"host":"alpha","created":"2026-11-25T12:00:00Z","config":[]}"#,
        )
        .unwrap();
        std::fs::write(layout::current(&dir), layout::current_text(&digest)).unwrap();
        if let Some(hb) = heartbeat {
            let path = dir.join("logs/heartbeat.json");
            std::fs::write(&path, hb.to_string()).unwrap();
            // Received when it says it was written: no clock skew.
            let stamp = hb["time"].as_str().and_then(state::parse_time);
            if let Some(t) = stamp {
                std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_modified(t)
                    .unwrap();
            }
        }
        (tmp, chroot)
    }

    fn heartbeat_json(extra: serde_json::Value) -> serde_json::Value {
        let mut hb = serde_json::json!({
            "format": 1, "host": "alpha", "time": "2026-11-25T12:00:00Z", "version": null,
            "system": null, "last_outcome": null, "last_report": null, "agent_version": "0.1.0",
        });
        hb.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        hb
    }

    fn status_of(chroot: &Chroot) -> HostStatus {
        let store = crate::server::store::ChrootStore::new(
            chroot.clone(),
            crate::server::chroot::Ownership::Leave,
        );
        let now = state::parse_time("2026-11-25T12:01:00Z").unwrap();
        host_status(
            &store,
            chroot,
            &Heads::default(),
            &Memo::default(),
            &alpha(),
            now,
            Duration::from_secs(900),
        )
    }

    #[test]
    fn a_row_from_remembered_files_is_the_row_from_the_files_and_a_rewrite_is_read() {
        let system =
            |c: char| format!("/nix/store/{}-nixos-system-alpha", c.to_string().repeat(32));
        let (_t, chroot) = chroot_with(Some(heartbeat_json(serde_json::json!({
            "system": system('a'), "version": Digest::of(b"m"),
        }))));
        let logs = chroot.host_dir(&alpha()).join("logs");
        let report = serde_json::json!({
            "format": 1, "id": "20261125T115500Z-0000abcd", "host": "alpha",
            "kind": "published", "version": Digest::of(b"m"), "previous_version": null,
            "outcome": "failure", "system_before": system('a'), "system_after": system('a'),
            "built_system": "not a store path", "started": "2026-11-25T11:54:00Z",
            "finished": "2026-11-25T11:55:00Z", "timings": {"total_ms": 60000},
            "agent_version": "0.1.0", "error": "build failed", "log_tail": "line 1\nline 2",
            "checks": [{"check": "failed-units", "result": "failed", "detail": "x.service"}],
            "clock_offset_s": 3,
        });
        std::fs::write(logs.join(LATEST_FILE), report.to_string()).unwrap();
        std::fs::create_dir_all(chroot.state_dir()).unwrap();
        let store = crate::server::store::ChrootStore::new(
            chroot.clone(),
            crate::server::chroot::Ownership::Leave,
        );
        let now = state::parse_time("2026-11-25T12:01:00Z").unwrap();
        let row = |memo: &Memo| {
            let row = host_status(
                &store,
                &chroot,
                &Heads::default(),
                memo,
                &alpha(),
                now,
                Duration::from_secs(900),
            );
            serde_json::to_value(row).unwrap()
        };
        let from_files = row(&Memo::default());
        // A note from a host's bad field must come back from the memo too.
        let error = from_files["error"].as_str().unwrap();
        assert!(
            error.contains("built_system is not a store path"),
            "{error}"
        );
        // Later by the real clock: every file here is settled, so remembered.
        let later = SystemTime::now() + Duration::from_secs(60);
        let path = chroot.state_dir().join(MEMO_FILE);
        let first = Memo::load(path.clone(), later);
        assert_eq!(row(&first), from_files);
        first.save(true);
        let second = Memo::load(path.clone(), later);
        let host = alpha();
        let reader = HostReader::new(&store, &host);
        let mut remembered = second.host(&host);
        let stamp = || reader.stamp(&Key::Current);
        assert!(remembered.get(Slot::Current, stamp).is_some());
        for (slot, _, key) in super::super::hostlogs::LOGS.iter() {
            assert!(
                remembered.get(*slot, || reader.stamp(key)).is_some(),
                "{slot:?}"
            );
        }
        drop(remembered);
        assert_eq!(row(&second), from_files, "the same row from the memo");

        // Rewritten in place, the same size, its modification time put back: read again.
        assert_eq!(from_files["last_success"], serde_json::Value::Null);
        std::thread::sleep(Duration::from_millis(20));
        let latest = logs.join(LATEST_FILE);
        let mtime = std::fs::metadata(&latest).unwrap().modified().unwrap();
        let text = std::fs::read_to_string(&latest).unwrap();
        std::fs::write(&latest, text.replace("\"failure\"", "\"success\"")).unwrap();
        let file = std::fs::File::options().write(true).open(&latest).unwrap();
        file.set_modified(mtime).unwrap();
        let third = Memo::load(path, later);
        assert_eq!(row(&third)["last_success"], "2026-11-25T11:55:00Z");
    }

    #[test]
    fn reboot_pending_and_signature_checking_come_from_the_heartbeat() {
        let (_t, chroot) = chroot_with(Some(heartbeat_json(serde_json::json!({
            "reboot_pending": true, "verifies_signatures": false,
        }))));
        let row = status_of(&chroot);
        assert!(row.reboot_pending);
        assert_eq!(row.verifies_signatures, Some(false));
        assert!(!row.unreadable);
        let (_t, chroot) = chroot_with(Some(heartbeat_json(serde_json::json!({
            "verifies_signatures": true,
        }))));
        let row = status_of(&chroot);
        assert!(!row.reboot_pending);
        assert_eq!(row.verifies_signatures, Some(true));
        // An agent older than the field says nothing: unknown, not "does not verify".
        let (_t, chroot) = chroot_with(Some(heartbeat_json(serde_json::json!({}))));
        assert_eq!(status_of(&chroot).verifies_signatures, None);
        let (_t, chroot) = chroot_with(None);
        let row = status_of(&chroot);
        assert_eq!((row.reboot_pending, row.verifies_signatures), (false, None));
    }

    #[test]
    fn a_file_the_server_cannot_read_marks_the_row_and_is_named_once() {
        let (_t, chroot) = chroot_with(None);
        let dir = chroot.host_dir(&alpha());
        // `current` that cannot be read as a file (here a directory; for a non-root reader
        // of a real chroot, permission denied).
        std::fs::remove_file(layout::current(&dir)).unwrap();
        std::fs::create_dir(layout::current(&dir)).unwrap();
        let row = status_of(&chroot);
        assert!(row.unreadable, "{row:?}");
        assert_eq!(
            row.state,
            State::Unknown,
            "not guessed from what could be read"
        );
        let error = row.error.unwrap();
        assert!(
            error.contains(&format!("{}: ", layout::current(&dir).display())),
            "{error}"
        );

        // The same error for two files (logs/ itself cannot be opened) is said once.
        let mut notes = Notes::default();
        notes.unreadable("/srv/bento/alpha/logs: Permission denied".into());
        notes.unreadable("/srv/bento/alpha/logs: Permission denied".into());
        notes.push("logs/latest.json: expected value".into());
        assert!(notes.unreadable);
        assert_eq!(notes.list.len(), 2, "{:?}", notes.list);

        // What a host planted (a link) is its doing: noted, the state is still known.
        let (_t, chroot) = chroot_with(None);
        let logs = chroot.host_dir(&alpha()).join("logs");
        std::os::unix::fs::symlink("/etc/passwd", logs.join("heartbeat.json")).unwrap();
        let row = status_of(&chroot);
        assert!(!row.unreadable, "{row:?}");
        assert!(row.error.unwrap().contains("symbolic link"));
    }

    #[test]
    fn a_host_whose_every_file_is_refused_is_unknown_and_its_text_escaped() {
        // Only refused files: not `new` (the host did write), but unknown.
        let field = "\u{1b}[2J\u{1b}]0;owned\u{7}";
        let (_t, chroot) = chroot_with(Some(heartbeat_json(serde_json::json!({ field: 1 }))));
        let logs = chroot.host_dir(&alpha()).join("logs");
        std::os::unix::fs::symlink("/etc/passwd", logs.join("latest.json")).unwrap();
        let row = status_of(&chroot);
        assert_eq!(row.state, State::Unknown, "{row:?}");
        assert!(!row.unreadable, "the host's doing, not the server's");
        let error = row.error.unwrap();
        assert!(!error.chars().any(terminal::is_unsafe), "{error:?}");
        assert!(error.contains("\\u{1b}[2J\\u{1b}]0;owned\\u{7}"), "{error}");
        // One good file is enough to judge by.
        let (_t, chroot) = chroot_with(Some(heartbeat_json(serde_json::json!({}))));
        let logs = chroot.host_dir(&alpha()).join("logs");
        std::os::unix::fs::symlink("/etc/passwd", logs.join("latest.json")).unwrap();
        assert_ne!(status_of(&chroot).state, State::Unknown);
        // Nothing written at all is still `new`.
        let (_t, chroot) = chroot_with(None);
        assert_eq!(status_of(&chroot).state, State::New);
    }

    #[test]
    fn the_server_receiving_a_file_is_its_modification_time_even_unread() {
        let mtime = |path: &std::path::Path, t: &str| {
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(state::parse_time(t).unwrap())
                .unwrap();
        };
        // A heartbeat stamped 12:00 that the server received at 11:00: an hour ahead.
        let (_t, chroot) = chroot_with(Some(heartbeat_json(serde_json::json!({}))));
        let logs = chroot.host_dir(&alpha()).join("logs");
        mtime(&logs.join("heartbeat.json"), "2026-11-25T11:00:00Z");
        let row = status_of(&chroot);
        assert_eq!(row.last_seen.as_deref(), Some("2026-11-25T11:00:00Z"));
        assert_eq!(row.clock_skew_s, Some(3600));
        // A newer latest.json too large to read still says when the host was last heard of.
        let big = vec![b' '; crate::protocol::report::MAX_REPORT_BYTES as usize + 1];
        std::fs::write(logs.join("latest.json"), big).unwrap();
        mtime(&logs.join("latest.json"), "2026-11-25T11:30:00Z");
        let row = status_of(&chroot);
        assert_eq!(row.last_seen.as_deref(), Some("2026-11-25T11:30:00Z"));
        assert!(row.error.unwrap().contains("larger than"));
    }

    #[test]
    fn old_reports_are_never_opened() {
        let (_t, chroot) = chroot_with(Some(heartbeat_json(serde_json::json!({}))));
        let reports = chroot.host_dir(&alpha()).join("logs/reports");
        std::fs::create_dir_all(&reports).unwrap();
        // Garbage, a link out of the chroot and a directory where a report should be: any
        // of them would be a note if status read the history.
        std::fs::write(reports.join("20261101T000000Z-00000000.json"), "not json").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", reports.join("20261102T000000Z-0.json")).unwrap();
        std::fs::create_dir(reports.join("20261103T000000Z-0.json")).unwrap();
        let row = status_of(&chroot);
        assert_eq!(row.error, None, "{row:?}");
        assert!(!row.unreadable);
    }

    #[test]
    fn manifest_head_from_the_canonical_prefix_or_the_whole_file() {
        let store = crate::server::store::MemStore::new();
        let key = Key::Manifest(Digest::of(b"any"));
        let sys = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-alpha-1";
        // A large canonical manifest: only the head is parsed, and a string that holds the
        // key's text (escaped) does not cut it short.
        let entries: Vec<String> = (0..5000)
            .map(|i| format!(r#"{{"path":"m{i:05}\",\"config\":","kind":"directory"}}"#))
            .collect();
        let canonical = format!(
            r#"{{"format":1,"host":"alpha","created":"2026-11-25T12:00:00Z","source_commit":"x\",\"config\":[","build":"flake","system":"{sys}","config":[{}],"files":[]}}"#,
            entries.join(",")
        );
        store
            .put(&alpha(), &key, format!("{canonical}\n").as_bytes())
            .unwrap();
        let h = read_head(&HostReader::new(&store, &alpha()), &key).unwrap();
        assert_eq!((h.format, h.created.as_str()), (1, "2026-11-25T12:00:00Z"));
        assert_eq!(h.system.unwrap().as_str(), sys);
        // Fields in another order: parsed whole.
        store
            .put(
                &alpha(),
                &key,
                br#"{"config":[],"format":1,"host":"alpha","created":"2026-11-25T13:00:00Z","system":null}"#,
            )
            .unwrap();
        let h = read_head(&HostReader::new(&store, &alpha()), &key).unwrap();
        assert_eq!(h.created, "2026-11-25T13:00:00Z");
        assert!(h.system.is_none());
    }
}
