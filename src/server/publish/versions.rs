//! What the publisher remembers of each host's kept format-2 versions, so a publish that
//! writes a new version reads none of the old ones back: numbering needs their serials,
//! collecting needs their order and what they use (their root tree, through
//! `store::trees`' edges, and their `files/`). A manifest is named by the hash of its bytes
//! and never changes, so what is remembered of it can never be stale; a version the memo
//! does not know, or whose serial the serial record does not prove, is read as before.
//!
//! Kept in the publisher's state as `versions`, unsynced: a crash leaves the last file
//! whole or one whose checksum fails, which is read as no memo at all.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::manifest::{Digest, Manifest};
use crate::protocol::HostName;

/// The memo's file name in the publisher's state directory.
pub const MEMO: &str = "versions";

/// The first line of the memo: its format.
const MAGIC: &[u8] = b"bento versions 1\n";

/// What numbering and collecting need of one format-2 version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub serial: u64,
    pub created: SystemTime,
    /// The digest of the manifest's root tree (what `store::trees` knows the edges of).
    pub root: Digest,
    /// The `files/` entries' objects, which no tree names.
    pub files: Vec<Digest>,
}

impl Summary {
    /// The summary of a format-2 manifest (`None` for format 1, whose manifest lists every
    /// object itself, and for a creation time before 1970 the memo cannot hold).
    pub fn of(m: &Manifest) -> Option<Self> {
        let tree = m.tree.as_ref()?;
        let created = m.created.system_time();
        created.duration_since(UNIX_EPOCH).ok()?;
        Some(Self {
            serial: m.serial,
            created,
            root: tree.root,
            files: m.files.iter().map(|f| f.sha256).collect(),
        })
    }

    /// As [`Manifest::order`].
    pub fn order(&self) -> (u64, SystemTime) {
        (self.serial, self.created)
    }
}

/// The kept versions of every host, as the last runs left them.
#[derive(Debug, Default)]
pub struct Versions {
    hosts: Mutex<HashMap<HostName, Vec<(Digest, Summary)>>>,
    changed: AtomicBool,
}

impl Versions {
    /// The memo saved at `path`; an empty one when it is absent, torn or of another format.
    pub fn load(path: &std::path::Path) -> Self {
        let hosts = match std::fs::read(path) {
            Ok(bytes) => parse(&bytes).unwrap_or_else(|| {
                tracing::debug!("{}: not a whole versions memo; ignored", path.display());
                HashMap::new()
            }),
            Err(_) => HashMap::new(),
        };
        Self {
            hosts: Mutex::new(hosts),
            changed: AtomicBool::new(false),
        }
    }

    /// What is remembered of `host`'s version `digest`.
    pub fn get(&self, host: &HostName, digest: &Digest) -> Option<Summary> {
        let hosts = self.hosts.lock().expect("versions memo");
        let kept = hosts.get(host)?;
        kept.iter()
            .find(|(d, _)| d == digest)
            .map(|(_, s)| s.clone())
    }

    /// Replaces what is remembered of `host` with `kept`, the versions it keeps now.
    pub fn set(&self, host: &HostName, mut kept: Vec<(Digest, Summary)>) {
        kept.sort_by_key(|(d, _)| *d);
        let mut hosts = self.hosts.lock().expect("versions memo");
        if hosts.get(host) != Some(&kept) {
            hosts.insert(host.clone(), kept);
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    /// Marks every remembered root as in use in `store::trees`' edges, so they are saved
    /// with them: collecting those versions later walks no tree.
    pub fn touch_roots(&self) {
        let hosts = self.hosts.lock().expect("versions memo");
        for (_, s) in hosts.values().flatten() {
            crate::server::store::trees::touch(&s.root);
        }
    }

    /// Writes the memo to `path` if it changed. After a run over every host, `fleet` names
    /// them all: hosts no longer in it are forgotten.
    pub fn save(
        &self,
        path: &std::path::Path,
        fleet: Option<&BTreeSet<&HostName>>,
    ) -> std::io::Result<()> {
        let mut hosts = self.hosts.lock().expect("versions memo");
        if let Some(fleet) = fleet {
            let before = hosts.len();
            hosts.retain(|h, _| fleet.contains(h));
            if hosts.len() != before {
                self.changed.store(true, Ordering::Relaxed);
            }
        }
        if !self.changed.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        crate::sys::atomic::replace_unsynced(path, &encode(&hosts), 0o600)
    }
}

/// The magic line; per host (sorted) its name (u16 length), its version count (u32) and
/// per version its digest, serial, creation time (seconds u64, nanoseconds u32), root,
/// file count (u32) and file digests; then the SHA-256 of everything before it.
fn encode(hosts: &HashMap<HostName, Vec<(Digest, Summary)>>) -> Vec<u8> {
    let mut sorted: Vec<_> = hosts.iter().collect();
    sorted.sort_by_key(|(h, _)| *h);
    let mut out = MAGIC.to_vec();
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    for (host, kept) in sorted {
        let name = host.as_str().as_bytes();
        // Host names are short (a Unix account name); a longer one is not remembered.
        let Ok(len) = u16::try_from(name.len()) else {
            continue;
        };
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&count(kept.len()));
        for (d, s) in kept {
            let since = s.created.duration_since(UNIX_EPOCH).unwrap_or_default();
            out.extend_from_slice(d.as_bytes());
            out.extend_from_slice(&s.serial.to_le_bytes());
            out.extend_from_slice(&since.as_secs().to_le_bytes());
            out.extend_from_slice(&since.subsec_nanos().to_le_bytes());
            out.extend_from_slice(s.root.as_bytes());
            out.extend_from_slice(&count(s.files.len()));
            for f in &s.files {
                out.extend_from_slice(f.as_bytes());
            }
        }
    }
    let sum = Digest::of(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// The hosts of a whole memo; `None` for anything else (its checksum decides, so a torn or
/// edited file never gives a wrong serial).
fn parse(bytes: &[u8]) -> Option<HashMap<HostName, Vec<(Digest, Summary)>>> {
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    if Digest::of(body).as_bytes() != sum {
        return None;
    }
    let mut r = crate::sys::binary::Reader::after(body, MAGIC)?;
    let mut hosts = HashMap::new();
    while !r.is_empty() {
        let len = usize::from(r.u16()?);
        let host = HostName::new(std::str::from_utf8(r.bytes(len)?).ok()?).ok()?;
        let n = r.u32()?;
        let mut kept = Vec::new();
        for _ in 0..n {
            let d = Digest::from_bytes(r.take()?);
            let serial = r.u64()?;
            let (secs, nanos) = (r.u64()?, r.u32()?);
            let created = UNIX_EPOCH.checked_add(Duration::new(secs, nanos))?;
            let root = Digest::from_bytes(r.take()?);
            let files = (0..r.u32()?)
                .map(|_| r.take().map(Digest::from_bytes))
                .collect::<Option<Vec<_>>>()?;
            kept.push((
                d,
                Summary {
                    serial,
                    created,
                    root,
                    files,
                },
            ));
        }
        hosts.insert(host, kept);
    }
    Some(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> HostName {
        HostName::new(name).unwrap()
    }

    fn summary(serial: u64) -> Summary {
        Summary {
            serial,
            created: UNIX_EPOCH + Duration::new(1_700_000_000, 123_000_000),
            root: Digest::of(format!("root {serial}").as_bytes()),
            files: vec![Digest::of(b"secret")],
        }
    }

    #[test]
    fn a_saved_memo_reads_back_and_a_torn_or_edited_one_reads_as_none() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(MEMO);
        let memo = Versions::default();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        memo.set(&host("web"), vec![(a, summary(3)), (b, summary(2))]);
        memo.set(&host("db"), vec![(a, summary(1))]);
        memo.save(&path, None).unwrap();

        let back = Versions::load(&path);
        assert_eq!(back.get(&host("web"), &a), Some(summary(3)));
        assert_eq!(back.get(&host("web"), &b), Some(summary(2)));
        assert_eq!(back.get(&host("db"), &a), Some(summary(1)));
        assert_eq!(back.get(&host("db"), &b), None);

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(Versions::load(&path).get(&host("web"), &a), None, "torn");
        // A serial changed in place, the checksum left: not trusted.
        let mut edited = bytes.clone();
        let at = edited
            .windows(8)
            .position(|w| w == 3u64.to_le_bytes())
            .unwrap();
        edited[at] = 9;
        std::fs::write(&path, &edited).unwrap();
        assert_eq!(Versions::load(&path).get(&host("web"), &a), None, "edited");
    }

    /// `host`'s plan of round `round` in format 2: a shared file, and one of its own.
    fn plan2(host: &str, round: u64) -> crate::server::publish::HostPlan {
        let own = format!("{host} {round}");
        let mut plan = crate::server::publish::fixture::plan(
            host,
            &[("common/shared.nix", "shared"), ("own.nix", &own)],
            1_790_000_000 + round * 100,
        );
        plan.manifest
            .config
            .push(crate::protocol::manifest::ConfigEntry::Directory {
                path: crate::protocol::manifest::RelPath::new("common").unwrap(),
            });
        plan.manifest.canonicalize();
        let t = tempfile::tempdir().unwrap();
        super::super::packs::Packer::load(t.path().join("packs"))
            .pack(&mut plan)
            .unwrap();
        plan
    }

    #[test]
    fn a_new_version_reads_no_remembered_manifest_and_keeps_what_reading_them_keeps() {
        use crate::server::publish::{publish_host, Numbering};
        use crate::server::store::{Faulty, MemStore, Store};
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(MEMO);
        let other = tempfile::tempdir().unwrap();
        let records = [t.path(), other.path()].map(crate::server::records::Serials::new);
        let web = host("web");
        let (remembering, reading) = (MemStore::new(), MemStore::new());
        // Each round a run of its own: the memo loaded, then saved.
        let round = |store: &dyn Store, memo: bool, r: u64| {
            let versions = Versions::load(&path);
            let counting = Faulty::new(store, usize::MAX);
            let n = Numbering {
                record: Some(&records[usize::from(!memo)]),
                versions: memo.then_some(&versions),
                ..Default::default()
            };
            publish_host(&counting, &plan2("web", r), &n).unwrap();
            versions.save(&path, None).unwrap();
            counting.manifests_read()
        };
        let mut reads = Vec::new();
        for r in 1..=5 {
            reads.push(round(&remembering, true, r));
            round(&reading, false, r);
        }
        // The live manifest only, from the third round on (two kept versions besides it).
        assert_eq!(reads[3..], [1, 1], "{reads:?}");
        for store in [&remembering, &reading] {
            let keys: Vec<_> = store.keys(&web).into_iter().collect();
            let manifests = keys
                .iter()
                .filter(|k| matches!(k, crate::protocol::layout::Key::Manifest(_)))
                .count();
            assert_eq!(manifests, crate::server::publish::KEEP_VERSIONS);
        }
        let objects = |s: &MemStore| crate::server::store::listed_objects(s, &web).unwrap();
        assert_eq!(objects(&remembering), objects(&reading));
        let live = |s: &MemStore| crate::server::publish::live_version(s, &web).unwrap();
        assert_eq!(live(&remembering).1.serial, 5);
        assert!(live(&remembering).1.same_content(&live(&reading).1));
    }

    #[test]
    fn a_remembered_serial_the_record_does_not_prove_is_read_again() {
        use crate::server::publish::{publish_host, Numbering};
        use crate::server::store::{Faulty, MemStore};
        let t = tempfile::tempdir().unwrap();
        let versions = Versions::default();
        let store = MemStore::new();
        let serials = crate::server::records::Serials::new(t.path());
        let n = Numbering {
            record: Some(&serials),
            versions: Some(&versions),
            ..Default::default()
        };
        for r in 1..=3 {
            publish_host(&store, &plan2("web", r), &n).unwrap();
        }
        // The record lost (a new state directory), the memo kept: the memo proves nothing,
        // so the kept manifests are read and numbering still goes above them.
        let other = tempfile::tempdir().unwrap();
        let lost = crate::server::records::Serials::new(other.path());
        let counting = Faulty::new(&store, usize::MAX);
        let n = Numbering {
            record: Some(&lost),
            versions: Some(&versions),
            ..Default::default()
        };
        publish_host(&counting, &plan2("web", 4), &n).unwrap();
        assert_eq!(counting.manifests_read(), 3);
        let (_, live) = crate::server::publish::live_version(&store, &host("web")).unwrap();
        assert_eq!(live.serial, 4);
    }

    #[test]
    fn an_unchanged_memo_is_not_written_and_a_full_run_forgets_gone_hosts() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(MEMO);
        let memo = Versions::default();
        let a = Digest::of(b"a");
        memo.set(&host("web"), vec![(a, summary(1))]);
        memo.set(&host("old"), vec![(a, summary(1))]);
        memo.save(&path, None).unwrap();
        std::fs::remove_file(&path).unwrap();
        memo.set(&host("web"), vec![(a, summary(1))]);
        memo.save(&path, None).unwrap();
        assert!(!path.exists(), "nothing changed, nothing written");

        let web = host("web");
        memo.save(&path, Some(&BTreeSet::from([&web]))).unwrap();
        let back = Versions::load(&path);
        assert_eq!(back.get(&web, &a), Some(summary(1)));
        assert_eq!(back.get(&host("old"), &a), None);
    }
}
