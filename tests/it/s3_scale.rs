//! Issue #22 items 5 and 6 over real SeaweedFS configured from `bento server s3-policy`:
//! a second `bento status` asks for every host's `current` and reports with the ETags it
//! saw (304s counted at a relay, no bodies) and still shows a changed report; a publish
//! killed after one host committed leaves that host's index on disk, used as it is by the
//! next publish (a no-change publish is then one 304 per host); an agent whose clock is
//! hours off (libfaketime) polls, says the offset it corrected in its heartbeat and report
//! (`clock_offset_s`), and `bento status` shows it beside the clock skew.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bento::protocol::report::{Heartbeat, Report};

use crate::agent::{code, fleet, text, write_version, Machine, EXIT_NOOP, EXIT_UPDATED};
use crate::common::relay::Relay;
use crate::common::sshd::Sshd;
use crate::s3_publish::{ok, read, run, OnSeaweed};

/// A fleet whose store is SeaweedFS (reached through a counting relay) configured from the
/// printed policy, the publisher's state and credentials outside the fleet repo.
pub(crate) struct Fleet {
    pub(crate) sshd: Sshd,
    pub(crate) store: OnSeaweed,
    pub(crate) relay: Relay,
}

impl Fleet {
    pub(crate) fn start(hosts: &[&str]) -> Fleet {
        Self::start_with(hosts, |_| {})
    }

    /// [`Fleet::start`], with `prepare` run on the fleet repo before anything is published
    /// or the policy printed.
    pub(crate) fn start_with(hosts: &[&str], prepare: impl FnOnce(&Sshd)) -> Fleet {
        let sshd = Sshd::start(hosts);
        prepare(&sshd);
        fleet(&sshd);
        let f = sshd.fleet();
        let store = OnSeaweed::start(&f);
        let port = store.engine.endpoint.rsplit(':').next().unwrap();
        let relay = Relay::start(port.parse().unwrap());
        store.publish_through(&f, &format!("http://127.0.0.1:{}", relay.port));
        Fleet { sshd, store, relay }
    }

    pub(crate) fn fleet(&self) -> PathBuf {
        self.sshd.fleet()
    }

    /// The host's agent, with only its printed rights, talking to the engine directly.
    pub(crate) fn machine(&self, host: &str) -> Machine<'_> {
        let m = Machine::new(&self.sshd, host, "");
        self.store.agent(&m, &self.store.engine.endpoint, "");
        m
    }

    fn status(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&ok(run(&self.fleet(), &["status", "--json"]))).unwrap()
    }
}

fn row<'a>(rows: &'a [serde_json::Value], host: &str) -> &'a serde_json::Value {
    rows.iter().find(|r| r["host"] == host).expect("host row")
}

#[test]
fn s3_status_asks_with_the_etags_it_saw_and_still_shows_a_changed_report() {
    let t = Fleet::start(&["alpha", "beta"]);
    ok(run(&t.fleet(), &["publish", "--no-eval"]));
    for host in ["alpha", "beta"] {
        let out = t.machine(host).update();
        assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    }
    // The first run reads every host's files whole and keeps what it read.
    let first = t.status();
    assert_eq!(row(&first, "alpha")["state"], "up-to-date", "{first:?}");
    t.relay.reset();
    let again = t.status();
    assert_eq!(again, first, "the same status from the cached copies");
    let statuses = t.relay.statuses();
    // Per host: `current`, `heartbeat.json` and `latest.json`, each a 304 with no body (the
    // manifest's head comes from the publisher's own checked copy).
    assert_eq!(
        statuses.iter().filter(|s| **s == 304).count(),
        6,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 304),
        "nothing read whole: {statuses:?}"
    );

    // A new version applied by alpha: its changed report is read and shown.
    write_version(&t.sshd, "2");
    ok(run(&t.fleet(), &["publish", "--no-eval"]));
    let out = t.machine("alpha").update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let latest = Report::parse(
        &read(
            &t.store.engine.admin_client(),
            "hosts/alpha/logs/latest.json",
        )
        .unwrap(),
    )
    .unwrap();
    let rows = t.status();
    let alpha = row(&rows, "alpha");
    assert_eq!(alpha["state"], "up-to-date", "{alpha}");
    assert_eq!(
        alpha["running_version"],
        latest.version.to_string(),
        "{alpha}"
    );
    assert_eq!(alpha["published"], latest.version.to_string(), "{alpha}");
    // Beta has not applied it: its unchanged reports (304s) still say the old version.
    assert_ne!(
        row(&rows, "beta")["running_version"],
        latest.version.to_string()
    );
}

/// The publisher's index file of `host`, as JSON.
fn index_of(state: &Path, host: &str) -> serde_json::Value {
    let path = state.join(".bento/s3-index").join(format!("{host}.json"));
    serde_json::from_slice(&fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

#[test]
fn s3_a_publish_killed_after_one_host_committed_leaves_an_index_the_next_publish_uses() {
    let t = Fleet::start(&["alpha", "beta"]);
    let f = t.fleet();
    ok(run(&f, &["publish", "--no-eval"]));
    let admin = t.store.engine.admin_client();
    let current = |host: &str| read(&admin, &format!("hosts/{host}/current"));
    let alpha_v1 = current("alpha").unwrap();
    let beta_v1 = current("beta").unwrap();

    // Version 2: alpha's change is small, beta's is 4 MiB that the throttled link takes
    // many seconds to send, so alpha commits long before beta can.
    write_version(&t.sshd, "2");
    // Text (the toy flake reads it as a Nix string), little repetition.
    let big: Vec<u8> = (0..4u32 << 20)
        .map(|i| b"0123456789abcdef"[((i.wrapping_mul(2_654_435_761) >> 13) & 15) as usize])
        .collect();
    fs::write(f.join("hosts/beta/payload.txt"), big).unwrap();
    t.relay.throttle(256 * 1024);
    let mut child = crate::common::bento_std()
        .args(["publish", "--no-eval", "--fleet"])
        .arg(&f)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Alpha's commit is kept on disk while the publish still runs (beta not committed),
    // not when the publisher ends.
    let deadline = Instant::now() + Duration::from_secs(120);
    let kept = |state: &Path| -> Option<String> {
        let path = state.join(".bento/s3-index/alpha.json");
        let index: serde_json::Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
        let text = index["current"].as_object()?.values().next()?[0].as_str()?;
        Some(text.to_owned())
    };
    let alpha_v1_text = String::from_utf8(alpha_v1.clone()).unwrap();
    while kept(&t.store.state).as_deref() == Some(alpha_v1_text.as_str()) {
        assert!(
            Instant::now() < deadline,
            "alpha's index never kept its commit"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "publish ended too soon"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(current("beta"), Some(beta_v1), "beta not committed yet");
    // Killed: no Drop, no clean exit.
    child.kill().unwrap();
    child.wait().unwrap();
    t.relay.throttle(0);
    let alpha_v2 = String::from_utf8(current("alpha").unwrap()).unwrap();
    assert_ne!(alpha_v2, alpha_v1_text);
    assert_eq!(
        kept(&t.store.state).as_deref(),
        Some(alpha_v2.as_str()),
        "alpha's commit is in its index: {}",
        index_of(&t.store.state, "alpha")
    );

    // The next publish finishes beta; then an unchanged publish costs one 304 per host.
    ok(run(&f, &["publish", "--no-eval"]));
    assert_ne!(current("beta"), None);
    t.relay.reset();
    ok(run(&f, &["publish", "--no-eval"]));
    // The index is used: nothing is written, no object or manifest is asked for, and each
    // host's `current` is a 304. The only other request is the serial check's heartbeat:
    // the live versions are the last the publisher numbered, so no listing of manifests.
    let requests = t.relay.requests();
    let statuses = t.relay.statuses();
    assert_eq!(requests.len(), 4, "two per host: {requests:?}");
    // The relay notes a path without its query: a listing asks for the bucket itself.
    assert!(
        !requests
            .iter()
            .any(|r| r.trim_end_matches('/') == "GET /fleet"),
        "{requests:?}"
    );
    assert!(
        requests.iter().all(|r| r.starts_with("GET ")),
        "{requests:?}"
    );
    assert!(
        !requests
            .iter()
            .any(|r| r.contains("/objects/") || r.contains("/manifests/")),
        "{requests:?}"
    );
    for host in ["alpha", "beta"] {
        let i = requests
            .iter()
            .position(|r| *r == format!("GET /fleet/hosts/{host}/current"))
            .expect("current asked for");
        assert_eq!(statuses[i], 304, "{requests:?} {statuses:?}");
    }
    // Nothing the index claimed is missing: every key each live version names is there,
    // and alpha's agent applies it.
    for host in ["alpha", "beta"] {
        let digest = String::from_utf8(current(host).unwrap()).unwrap();
        let bytes = read(
            &admin,
            &format!("hosts/{host}/manifests/{}.json", digest.trim()),
        )
        .expect("live manifest");
        let manifest = bento::protocol::manifest::Manifest::parse(&bytes).unwrap();
        for object in manifest.objects() {
            let key = format!("hosts/{host}/objects/{}", object.to_hex());
            assert!(
                admin.head("fleet", &key).unwrap().is_some(),
                "{key} missing"
            );
        }
    }
    let out = t.machine("alpha").update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
}

/// libfaketime's preload library, wherever Debian put it for this architecture.
fn libfaketime() -> PathBuf {
    fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime is installed (scripts/test.sh installs faketime)")
}

#[test]
fn s3_an_agent_hours_off_corrects_its_clock_says_so_and_status_shows_it() {
    let t = Fleet::start(&["alpha"]);
    ok(run(&t.fleet(), &["publish", "--no-eval"]));
    let m = t.machine("alpha");
    let lib = libfaketime();
    let env = [
        ("LD_PRELOAD", lib.to_str().unwrap()),
        ("FAKETIME", "-3h"),
        ("DONT_FAKE_MONOTONIC", "1"),
    ];
    let out = m.update_with(&env, &[]);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let admin = t.store.engine.admin_client();
    let offset = |v: Option<i64>| v.expect("clock_offset_s said");
    let report = Report::parse(&read(&admin, "hosts/alpha/logs/latest.json").unwrap()).unwrap();
    let hb = Heartbeat::parse(&read(&admin, "hosts/alpha/logs/heartbeat.json").unwrap()).unwrap();
    // The engine's clock is 3 h ahead of this agent's.
    for o in [offset(report.clock_offset_s), offset(hb.clock_offset_s)] {
        assert!((o - 3 * 3600).abs() < 120, "{o}");
    }
    let rows = t.status();
    let alpha = row(&rows, "alpha");
    assert_eq!(alpha["state"], "up-to-date", "{alpha}");
    assert!(
        (alpha["clock_offset_s"].as_i64().unwrap() - 3 * 3600).abs() < 120,
        "{alpha}"
    );
    let skew = alpha["clock_skew_s"]
        .as_i64()
        .expect("skew from Last-Modified");
    assert!((skew + 3 * 3600).abs() < 300, "{alpha}");
    let error = alpha["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("clock skew") && error.contains("clock corrected"),
        "{alpha}"
    );

    // A right clock corrects nothing and says nothing.
    let out = m.update();
    assert_eq!(code(&out), EXIT_NOOP, "{}", text(&out));
    let hb = Heartbeat::parse(&read(&admin, "hosts/alpha/logs/heartbeat.json").unwrap()).unwrap();
    assert_eq!(hb.clock_offset_s, None);
    let rows = t.status();
    assert_eq!(
        row(&rows, "alpha")["clock_offset_s"],
        serde_json::Value::Null
    );
}
