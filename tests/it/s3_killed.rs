//! A publish to SeaweedFS killed after its k-th mutating request, for every k of a small
//! changed fleet (two hosts, one change each), with the real agents (real Nix) applying
//! after each kill: each host applies the old version or the new one, whole, and the next
//! publish leaves only the kept versions' keys in the bucket. A relay in front of the
//! engine (tests/it/common/s3cut.rs) lets the first k PUT/POST/DELETE through and holds the
//! next one unanswered; the test then SIGKILLs the real `bento publish` process, so its
//! local state is whatever it had written when it died.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bento::protocol::manifest::Manifest;
use bento::server::publish::KEEP_VERSIONS;
use bento::sys::s3::Client;

use crate::agent::{code, fleet, text, Machine, EXIT_UPDATED};
use crate::common::bento_std;
use crate::common::s3cut::MutationCut;
use crate::common::sshd::Sshd;
use crate::s3_publish::{ok, read, run, OnSeaweed};
use crate::signing::{keygen, set_signing_key};

const BUCKET: &str = "fleet";
const HOSTS: [&str; 2] = ["alpha", "beta"];
/// The whole scenario's bound, so a hang fails instead of waiting: it takes about 20 s
/// alone, and well over 90 s beside the rest of the suite on 2 busy cores.
const BUDGET: Duration = Duration::from_secs(300);

fn live(admin: &Client, host: &str) -> String {
    let bytes = read(admin, &format!("hosts/{host}/current")).expect("current");
    String::from_utf8(bytes).unwrap().trim().to_owned()
}

/// Only the kept versions' keys under the host's prefix: `current`, at most
/// `KEEP_VERSIONS` manifests (the live one among them), each with its signature and no
/// other signature, exactly the objects the kept manifests use, and the host's `logs/`.
fn assert_only_kept(admin: &Client, host: &str, k: usize) {
    let prefix = format!("hosts/{host}/");
    let mut manifests = BTreeMap::new();
    let mut signatures = BTreeSet::new();
    let mut objects = BTreeSet::new();
    for listed in admin.list(BUCKET, &prefix).unwrap() {
        let key = listed.key.strip_prefix(&prefix).unwrap().to_owned();
        if key == "current" || key.starts_with("logs/") {
            continue;
        } else if let Some(d) = key
            .strip_prefix("manifests/")
            .and_then(|m| m.strip_suffix(".json"))
        {
            let bytes = read(admin, &listed.key).unwrap();
            manifests.insert(d.to_owned(), Manifest::parse(&bytes).unwrap());
        } else if let Some(d) = key
            .strip_prefix("manifests/")
            .and_then(|m| m.strip_suffix(".sig"))
        {
            signatures.insert(d.to_owned());
        } else if let Some(d) = key.strip_prefix("objects/") {
            objects.insert(d.to_owned());
        } else {
            panic!("k={k}: {host}: a key no version names: {key}");
        }
    }
    assert!(
        (1..=KEEP_VERSIONS).contains(&manifests.len()),
        "k={k}: {host} keeps {} manifests",
        manifests.len()
    );
    assert!(
        manifests.contains_key(&live(admin, host)),
        "k={k}: {host}'s live manifest is gone"
    );
    assert_eq!(
        signatures,
        manifests.keys().cloned().collect(),
        "k={k}: {host}: every kept manifest signed, no signature without its manifest"
    );
    let used: BTreeSet<String> = manifests
        .values()
        .flat_map(|m| m.objects())
        .map(|d| d.to_string())
        .collect();
    assert_eq!(
        objects, used,
        "k={k}: {host}'s objects are not the kept ones"
    );
}

/// One `bento publish`, SIGKILLed when it waits on its (k+1)-th mutating request (the
/// relay holds it unanswered); `true` when it ran to its end within k requests instead.
fn publish_killed_after(cut: &MutationCut, f: &Path, k: usize) -> bool {
    cut.arm_holding(k);
    let mut child = bento_std()
        .args(["publish", "--no-eval", "--fleet"])
        .arg(f)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bento publish");
    let deadline = Instant::now() + Duration::from_secs(60);
    let finished = loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            assert!(
                cut.disarm() <= k,
                "k={k}: the publish ended ({status}) before its (k+1)-th request was held: {err}"
            );
            assert!(status.success(), "k={k}: {err}");
            break true;
        }
        if cut.held() > 0 {
            child.kill().unwrap();
            child.wait().unwrap();
            cut.disarm();
            break false;
        }
        assert!(
            Instant::now() < deadline,
            "k={k}: publish neither ended nor was held"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    // The held connections end with their client.
    let gone = Instant::now() + Duration::from_secs(10);
    while cut.held() > 0 {
        assert!(
            Instant::now() < gone,
            "k={k}: a held request outlived its client"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    finished
}

fn set_payloads(f: &Path, text: &str) {
    for h in HOSTS {
        fs::write(
            f.join("hosts").join(h).join("payload.txt"),
            format!("{h} {text}\n"),
        )
        .unwrap();
    }
}

/// What a user relies on when the publishing machine dies mid-publish (power, OOM, a
/// network cut to the engine): no host ever applies a version that is half there or a mix
/// of two, and the next publish cleans up after the dead one, for every moment it can die.
#[test]
fn s3_publish_killed_after_any_mutating_request_leaves_whole_versions_on_seaweedfs() {
    let started = Instant::now();
    let sshd = Sshd::start(&HOSTS);
    // A signing fleet, so signatures are among the keys a kill can leave half-written.
    let key = sshd.dir.join("signing/key");
    let public = keygen(&key);
    set_signing_key(&sshd, &key);
    fleet(&sshd);
    let f = sshd.fleet();
    let store = OnSeaweed::start(&f);
    let engine = &store.engine;
    let admin = engine.admin_client();
    let cut = MutationCut::start(&engine.endpoint);
    store.publish_through(&f, &cut.endpoint());

    // Agents straight to the engine (their report PUTs are not the publisher's requests).
    let machines: Vec<Machine<'_>> = HOSTS
        .iter()
        .map(|h| {
            let m = Machine::new(&sshd, h, "");
            store.agent(
                &m,
                &engine.endpoint,
                &format!("trusted_keys = [\"{public}\"]\n"),
            );
            m
        })
        .collect();
    // The payload each machine runs and the digest it applied.
    let mut applied: Vec<Option<String>> = vec![None; HOSTS.len()];

    set_payloads(&f, "start");
    ok(run(&f, &["publish", "--no-eval"]));
    let mut old = "start".to_owned();
    let mut agent_runs = 0;
    // How often a host was found on the old and on the new version after a kill.
    let (mut on_old, mut on_new) = (0, 0);
    for k in 0..200 {
        assert!(started.elapsed() < BUDGET, "k={k}: over {BUDGET:?}");
        let new = format!("{k} killed");
        set_payloads(&f, &new);
        let finished = publish_killed_after(&cut, &f, k);

        // Each host whose live version moved applies it: the old payload or the new one,
        // never a failure from a missing or mismatched key.
        let lives: Vec<String> = HOSTS.iter().map(|h| live(&admin, h)).collect();
        let runs: Vec<(usize, std::process::Output)> = std::thread::scope(|s| {
            let handles: Vec<_> = machines
                .iter()
                .enumerate()
                .filter(|(i, _)| applied[*i].as_ref() != Some(&lives[*i]))
                .map(|(i, m)| (i, s.spawn(move || m.update())))
                .collect();
            handles
                .into_iter()
                .map(|(i, h)| (i, h.join().unwrap()))
                .collect()
        });
        for (i, out) in runs {
            agent_runs += 1;
            let m = &machines[i];
            assert_eq!(code(&out), EXIT_UPDATED, "k={k} {}: {}", m.host, text(&out));
            let system = m.profile_target().expect("a system");
            let payload = fs::read_to_string(format!("{system}/payload")).unwrap();
            let payload = payload.trim_end().to_owned();
            let whole = [&old, &new].map(|p| format!("{} {p}", m.host));
            assert!(
                whole.contains(&payload),
                "k={k} {}: runs {payload:?}, neither {whole:?}",
                m.host
            );
            if payload == whole[0] {
                on_old += 1;
            } else {
                on_new += 1;
            }
            applied[i] = Some(lives[i].clone());
        }

        // The next publish (other content again) removes what the killed one left. It
        // reverts to the content of two rounds ago, whose objects the killed run's GC was
        // removing: a publisher that trusted what it knew before the kill would skip them.
        old = ["reverted A", "reverted B"][k % 2].to_owned();
        set_payloads(&f, &old);
        let out = run(&f, &["publish", "--no-eval"]);
        assert!(out.status.success(), "k={k}: {}", text(&out));
        for h in HOSTS {
            assert_only_kept(&admin, h, k);
        }
        if finished {
            // The publish ran to its end within k requests: every moment was covered.
            assert!(
                k > 5,
                "a changed fleet's publish makes more than 5 requests"
            );
            eprintln!(
                "killed at each of {k} mutating requests; {agent_runs} agent runs ({on_old} on the old version, {on_new} on the new) in {:?}",
                started.elapsed()
            );
            return;
        }
    }
    panic!("a publish of two hosts never finished within 200 mutating requests");
}
