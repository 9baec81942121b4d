//! Two publishers racing on SeaweedFS, each with its own local state (so its lock guards
//! nothing the other takes): whole `publish_host` runs interleaved so that both read the
//! same live version and one runs whole while the other is between numbering its version
//! and writing it, or between its manifest and its switch. The engine's compare-and-swap lets one switch per host per
//! round, the other fails with "another publish won", and the store never holds two
//! digests under one serial.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bento::protocol::layout::{Area, Chroot, Key};
use bento::protocol::manifest::{Build, ConfigEntry, Digest, Manifest, RelPath, FORMAT};
use bento::protocol::signing::Signer;
use bento::protocol::{HostName, Timestamp};
use bento::server::hostfiles::Source;
use bento::server::publish::{publish_host, HostPlan, Numbering, PublishError};
use bento::server::store::{
    Capabilities, Cas, LogEntry, LogsError, OpenObject, S3Store, Store, StoreError, StoreLock,
    Version,
};

use crate::common::engines::SeaweedFs;

const BUCKET: &str = "fleet";

fn alpha() -> HostName {
    HostName::new("alpha").unwrap()
}

/// A publisher's view of the engine with its own (local) state.
fn publisher(engine: &SeaweedFs, state: &Path) -> S3Store {
    let files = format!(
        "s3://{BUCKET}/hosts/{{host}}?endpoint={}&region=us-east-1",
        engine.endpoint
    )
    .parse()
    .unwrap();
    S3Store::new(
        engine.admin_client(),
        files,
        None,
        Chroot::new(state),
        vec![alpha()],
    )
    .with_cas(Cas::Honoured)
}

/// alpha's version whose one file holds `text`.
fn plan(text: &str, secs: u64) -> HostPlan {
    let bytes: Arc<[u8]> = text.as_bytes().into();
    let sha = Digest::of(&bytes);
    let mut manifest = Manifest {
        format: FORMAT,
        host: alpha(),
        created: Timestamp::millis(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)),
        serial: 0,
        source_commit: None,
        dirty: false,
        build: Build::Classic,
        system: None,
        config: vec![ConfigEntry::File {
            path: RelPath::new("configuration.nix").unwrap(),
            size: bytes.len() as u64,
            sha256: sha,
            executable: false,
        }],
        tree: None,
        files: vec![],
    };
    manifest.canonicalize();
    HostPlan {
        host: alpha(),
        manifest,
        sources: [(sha, Source::Bytes(bytes))].into_iter().collect(),
        keep_live: None,
        live: None,
    }
}

/// Where the other publisher's whole run is slipped into this one's.
#[derive(Debug, Clone, Copy)]
enum Point {
    /// After this one numbered its version, before it wrote anything: both number the
    /// same serial.
    Numbered,
    /// Between this one's manifest and its switch of `current`.
    Switching,
}

/// A store that runs `other` (the other publisher's whole run) at `at`: both have read the
/// same live version by then.
struct Interleaved<'a> {
    inner: &'a dyn Store,
    at: Point,
    other: Mutex<Option<Box<dyn FnOnce() + Send + 'a>>>,
}

impl Interleaved<'_> {
    fn run_other(&self, now: Point) {
        if std::mem::discriminant(&now) == std::mem::discriminant(&self.at) {
            if let Some(other) = self.other.lock().unwrap().take() {
                other();
            }
        }
    }
}

impl Store for Interleaved<'_> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn locate(&self, host: &HostName, key: &Key) -> PathBuf {
        self.inner.locate(host, key)
    }
    fn lock(&self, on_wait: Box<dyn FnOnce() + '_>) -> Result<StoreLock, StoreError> {
        self.inner.lock(on_wait)
    }
    fn hosts(&self) -> Result<Vec<HostName>, StoreError> {
        self.inner.hosts()
    }
    fn open_host(&self, host: &HostName) -> Result<(), StoreError> {
        self.run_other(Point::Numbered);
        self.inner.open_host(host)
    }
    fn get(&self, host: &HostName, key: &Key, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(host, key, limit)
    }
    fn get_prefix(
        &self,
        host: &HostName,
        key: &Key,
        len: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_prefix(host, key, len)
    }
    fn exists(&self, host: &HostName, key: &Key) -> Result<bool, StoreError> {
        self.inner.exists(host, key)
    }
    fn list(&self, host: &HostName, area: Area) -> Result<Vec<Key>, StoreError> {
        self.inner.list(host, area)
    }
    fn put(&self, host: &HostName, key: &Key, bytes: &[u8]) -> Result<(), StoreError> {
        self.inner.put(host, key, bytes)
    }
    fn put_object(
        &self,
        host: &HostName,
        digest: &Digest,
        open: OpenObject<'_>,
    ) -> Result<Option<u64>, StoreError> {
        self.inner.put_object(host, digest, open)
    }
    fn put_shared(&self, host: &HostName, key: &Key, pooled: &Path) -> Result<bool, StoreError> {
        self.inner.put_shared(host, key, pooled)
    }
    fn delete(&self, host: &HostName, key: &Key) -> Result<(), StoreError> {
        self.inner.delete(host, key)
    }
    fn current(&self, host: &HostName) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
        self.inner.current(host)
    }
    fn switch_current(
        &self,
        host: &HostName,
        to: &Digest,
        from: Option<&Version>,
    ) -> Result<(), StoreError> {
        self.run_other(Point::Switching);
        self.inner.switch_current(host, to, from)
    }
    fn collect_shared(&self) -> Result<usize, StoreError> {
        self.inner.collect_shared()
    }
    fn list_logs(&self, host: &HostName, dir: Option<&str>) -> Result<Vec<LogEntry>, LogsError> {
        self.inner.list_logs(host, dir)
    }
    fn read_log(
        &self,
        host: &HostName,
        dir: Option<&str>,
        name: &str,
    ) -> Result<Vec<u8>, LogsError> {
        self.inner.read_log(host, dir, name)
    }
}

/// Every kept manifest's serial and digest.
fn serials(store: &dyn Store) -> Vec<(u64, Digest)> {
    store
        .list(&alpha(), Area::Manifests)
        .unwrap()
        .into_iter()
        .filter_map(|key| match key {
            Key::Manifest(d) => {
                let bytes = store.get(&alpha(), &key, u64::MAX).unwrap()?;
                Some((Manifest::parse(&bytes).unwrap().serial, d))
            }
            _ => None,
        })
        .collect()
}

fn live(store: &dyn Store) -> Digest {
    let (bytes, _) = store.current(&alpha()).unwrap().unwrap();
    bento::protocol::layout::parse_current(&String::from_utf8(bytes).unwrap()).unwrap()
}

/// What a user relies on when two publishers run at once against an engine that honours
/// conditional writes (two operators, or a CI job beside a manual run): each round one of
/// them switches the host and the other is told "another publish won", never both, and
/// no serial ever names two versions (hosts order versions by serial and refuse a replay).
#[test]
fn s3_two_publishers_racing_on_seaweedfs_one_switch_per_round_one_digest_per_serial() {
    let engine = SeaweedFs::start(BUCKET, &[], None);
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    bento::protocol::signing::generate(&key, "race").unwrap();
    let signer = Signer::load(&key).unwrap();
    let numbering = Numbering::signed(Some(&signer));
    let (a, b) = (
        publisher(&engine, &tmp.path().join("a")),
        publisher(&engine, &tmp.path().join("b")),
    );
    publish_host(&a, &plan("first", 1_790_000_000), &numbering).unwrap();

    for round in 0..4u64 {
        // Each publisher is the interrupted one in turn, at each point in turn.
        let (slow, fast): (&dyn Store, &dyn Store) =
            if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let at = if round < 2 {
            Point::Numbered
        } else {
            Point::Switching
        };
        let before = live(slow);
        let fast_result: Arc<Mutex<Option<Result<Digest, String>>>> = Arc::default();
        let into = fast_result.clone();
        let fast_plan = plan(&format!("fast {round}"), 1_790_000_100 + round * 100);
        let numbering_fast = numbering;
        let slow_store = Interleaved {
            inner: slow,
            at,
            other: Mutex::new(Some(Box::new(move || {
                let r = publish_host(fast, &fast_plan, &numbering_fast)
                    .map(|r| r.digest.unwrap())
                    .map_err(|e| e.to_string());
                *into.lock().unwrap() = Some(r);
            }))),
        };
        let slow_plan = plan(&format!("slow {round}"), 1_790_000_100 + round * 100);
        let slow_result = publish_host(&slow_store, &slow_plan, &numbering);
        let fast_digest = fast_result
            .lock()
            .unwrap()
            .take()
            .expect("the other publisher ran")
            .unwrap_or_else(|e| panic!("round {round}: the first to switch failed: {e}"));
        match slow_result {
            Err(PublishError::Store(StoreError::Raced { .. })) => {}
            other => panic!("round {round} ({at:?}): the second switch from {before}: {other:?}"),
        }
        assert_eq!(live(slow), fast_digest, "round {round}: the winner is live");
        let kept = serials(slow);
        let mut by_serial: BTreeMap<u64, BTreeSet<Digest>> = BTreeMap::new();
        for (serial, d) in &kept {
            by_serial.entry(*serial).or_default().insert(*d);
        }
        for (serial, digests) in &by_serial {
            assert_eq!(
                digests.len(),
                1,
                "round {round} ({at:?}): serial {serial} names {digests:?}"
            );
        }
    }
}

/// A publisher remembers `current` as it last wrote it and does not read it before writing
/// a new version; when another publisher moved it meanwhile, the conditional switch is
/// lost, and the publisher reads `current` and publishes the host anyway, numbered above
/// the other's version: the operator sees "published", never a race nobody ran.
#[test]
fn s3_a_publisher_whose_memory_of_current_is_stale_reads_it_and_publishes_above_it() {
    let engine = SeaweedFs::start(BUCKET, &[], None);
    let tmp = tempfile::tempdir().unwrap();
    let numbering = Numbering::default();
    let (state_a, state_b) = (tmp.path().join("a"), tmp.path().join("b"));
    let run = |state: &Path, text: &str, secs: u64| {
        let store = publisher(&engine, state);
        let _lock = store.lock(Box::new(|| {})).unwrap();
        let report = publish_host(&store, &plan(text, secs), &numbering).unwrap();
        (report.status, report.digest.unwrap(), live(&store))
    };
    run(&state_a, "one", 1_790_000_000);
    let (_, two, _) = run(&state_b, "two", 1_790_000_100);

    {
        let a = publisher(&engine, &state_a);
        let _lock = a.lock(Box::new(|| {})).unwrap();
        let (_, stale) = a
            .remembered_current(&alpha())
            .expect("a remembers `current`");
        // Looked at with a third state: asking through a's would teach a the change.
        let peek = publisher(&engine, &tmp.path().join("peek"));
        let (_, now) = peek.current(&alpha()).unwrap().unwrap();
        assert_ne!(stale, now, "b moved `current` behind a's memory");
    }

    let (status, three, live_now) = run(&state_a, "three", 1_790_000_200);
    assert_eq!(status, bento::server::publish::Status::Published);
    assert_eq!(live_now, three);
    let store = publisher(&engine, &state_a);
    let kept = serials(&store);
    let serial_of = |d: &Digest| kept.iter().find(|(_, k)| k == d).map(|(s, _)| *s);
    assert!(
        serial_of(&three) > serial_of(&two),
        "numbered above the other's version: {kept:?}"
    );
    let distinct: BTreeSet<u64> = kept.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        distinct.len(),
        kept.len(),
        "one digest per serial: {kept:?}"
    );
}
