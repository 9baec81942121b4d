//! Issue #26 on the object store, over real SeaweedFS: GC of a format-2 host of a signing
//! fleet by the publisher's index. A change collects each host without listing it, without a
//! HEAD before its new keys, without reading a signature or its old trees back, while the
//! index saw every write since
//! its last listing; an index that is lost, restored from before the last publish, or whose
//! listing is too old falls back to one listing, and the collection then still leaves every
//! key a kept version needs and nothing else (a key the index never saw is collected once
//! the listing is taken again).

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use bento::protocol::manifest::{Digest, Manifest};
use bento::sys::s3::{Client, PutMode};

use crate::agent::write_version;
use crate::format2::{set_format_2, write_modules};
use crate::s3_publish::{ok, read, run};
use crate::s3_scale::Fleet;
use crate::signing::{keygen, set_signing_key};

const BUCKET: &str = "fleet";
const HOSTS: [&str; 2] = ["alpha", "beta"];
/// `publish::KEEP_VERSIONS`.
const KEEP_VERSIONS: usize = 3;

fn publish(t: &Fleet) {
    ok(run(&t.fleet(), &["publish", "--no-eval"]));
}

/// The host's keys under `manifests/` and `objects/`, relative to its prefix.
fn keys(admin: &Client, host: &str) -> BTreeSet<String> {
    let base = format!("hosts/{host}/");
    admin
        .list(BUCKET, &base)
        .unwrap()
        .into_iter()
        .filter_map(|l| l.key.strip_prefix(&base).map(str::to_owned))
        .filter(|k| k.starts_with("manifests/") || k.starts_with("objects/"))
        .collect()
}

/// Checks that the host keeps at most `KEEP_VERSIONS` manifests, the live one among them,
/// every key each of them needs (trees, packs, files: read from the engine), and nothing
/// else under `manifests/` and `objects/`.
fn collected(admin: &Client, host: &str, why: &str) {
    let there = keys(admin, host);
    let live = String::from_utf8(read(admin, &format!("hosts/{host}/current")).unwrap()).unwrap();
    let manifests: Vec<&String> = there.iter().filter(|k| k.ends_with(".json")).collect();
    assert!(
        (1..=KEEP_VERSIONS).contains(&manifests.len())
            && there.contains(&format!("manifests/{}.json", live.trim())),
        "{why}: {host} keeps {manifests:?}, live {live}"
    );
    let mut needed = BTreeSet::new();
    for key in manifests {
        needed.insert(key.clone());
        let digest = key
            .strip_prefix("manifests/")
            .and_then(|k| k.strip_suffix(".json"))
            .unwrap();
        for kin in ["sig", "fresh"] {
            let k = format!("manifests/{digest}.{kin}");
            if there.contains(&k) {
                needed.insert(k);
            }
        }
        let mut m = Manifest::parse(&read(admin, &format!("hosts/{host}/{key}")).unwrap()).unwrap();
        m.expand(|d| {
            Ok(read(admin, &format!("hosts/{host}/objects/{}", d.to_hex()))
                .unwrap_or_else(|| panic!("{why}: {host}: tree {d} of kept {key} missing")))
        })
        .unwrap();
        needed.extend(
            m.objects()
                .iter()
                .map(|d| format!("objects/{}", d.to_hex())),
        );
    }
    let missing: Vec<&String> = needed.difference(&there).collect();
    assert!(
        missing.is_empty(),
        "{why}: {host}: a kept version's keys missing: {missing:?}"
    );
    let extra: Vec<&String> = there.difference(&needed).collect();
    assert!(
        extra.is_empty(),
        "{why}: {host}: keys no kept version needs: {extra:?}"
    );
}

/// Puts an object no version uses under the host's prefix, as a publish killed by another
/// publisher's hand would leave it (the publisher's index never saw it).
fn plant_orphan(admin: &Client, host: &str, tag: &str) -> String {
    let bytes = format!("orphan {tag}\n");
    let key = format!("objects/{}", Digest::of(bytes.as_bytes()).to_hex());
    admin
        .put(
            BUCKET,
            &format!("hosts/{host}/{key}"),
            bytes.as_bytes(),
            PutMode::Overwrite,
        )
        .unwrap();
    key
}

fn index_path(state: &Path, host: &str) -> std::path::PathBuf {
    state.join(".bento/s3-index").join(format!("{host}.json"))
}

/// Makes the listing in the publisher's index of `host` `secs` old.
fn age_listing(state: &Path, host: &str, secs: u64) {
    let path = index_path(state, host);
    let mut index: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(index["listed"].is_u64(), "a listing kept: {index}");
    index["listed"] = serde_json::json!(now - secs);
    fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
}

fn listings(t: &Fleet) -> usize {
    t.relay
        .requests()
        .iter()
        // The relay notes a path without its query: a listing asks for the bucket itself.
        .filter(|r| r.trim_end_matches('/') == format!("GET /{BUCKET}"))
        .count()
}

#[test]
fn s3_a_change_collects_by_the_index_and_a_lost_stale_or_old_index_lists_again() {
    // A signing fleet: the serial check proves kept serials by the publisher's record
    // first, reading no signature.
    let t = Fleet::start_with(&HOSTS, |sshd| {
        write_modules(sshd, 40, 200);
        set_format_2(sshd);
        let key = sshd.dir.join("signing/key");
        keygen(&key);
        set_signing_key(sshd, &key);
    });
    let admin = t.store.engine.admin_client();
    publish(&t);
    write_version(&t.sshd, "2");
    publish(&t);
    for host in HOSTS {
        collected(&admin, host, "version 2");
    }

    // A change with a trusted index: per host the heartbeat, its new keys (sent once,
    // copied to the other host), its manifest, its signature and `current`: no listing, no
    // HEAD, no signature and no tree of the kept versions read, and no read of `current`
    // (remembered; its switch is conditional).
    let before: Vec<BTreeSet<String>> = HOSTS.iter().map(|h| keys(&admin, h)).collect();
    write_version(&t.sshd, "3");
    t.relay.reset();
    publish(&t);
    let requests = t.relay.requests();
    for (host, before) in HOSTS.iter().zip(&before) {
        let at = format!("/{BUCKET}/hosts/{host}/");
        let asked: Vec<&String> = requests.iter().filter(|r| r.contains(&at)).collect();
        let new_keys = keys(&admin, host)
            .difference(before)
            .filter(|k| k.starts_with("objects/"))
            .count();
        assert!(
            new_keys >= 2,
            "{host}: common/'s tree, a pack (the root is in the manifest)"
        );
        assert_eq!(
            asked.len(),
            new_keys + 4,
            "{host}: heartbeat, {new_keys} new objects, manifest, signature, current: {asked:?}"
        );
        assert!(
            asked
                .iter()
                .all(|r| r.starts_with("PUT ") || *r == &format!("GET {at}logs/heartbeat.json")),
            "{host}: {asked:?}"
        );
    }
    assert_eq!(listings(&t), 0, "{requests:?}");
    for host in HOSTS {
        collected(&admin, host, "version 3, collected by the index");
    }

    // A key the index never saw stays while the listing is trusted, and is collected once
    // the listing is older than the index may stand in for it (a week).
    let orphan = plant_orphan(&admin, "alpha", "1");
    write_version(&t.sshd, "4");
    publish(&t);
    assert!(
        keys(&admin, "alpha").contains(&orphan),
        "the index never saw it"
    );
    age_listing(&t.store.state, "alpha", 7 * 24 * 3600);
    write_version(&t.sshd, "5");
    t.relay.reset();
    publish(&t);
    assert_eq!(
        listings(&t),
        1,
        "alpha listed once, beta not: {:?}",
        t.relay.requests()
    );
    for host in HOSTS {
        collected(&admin, host, "version 5, alpha's listing aged");
    }

    // The index lost: one listing per host, the orphan collected, nothing kept lost.
    let orphan = plant_orphan(&admin, "beta", "2");
    fs::remove_dir_all(t.store.state.join(".bento/s3-index")).unwrap();
    write_version(&t.sshd, "6");
    t.relay.reset();
    publish(&t);
    assert_eq!(listings(&t), HOSTS.len(), "{:?}", t.relay.requests());
    assert!(!keys(&admin, "beta").contains(&orphan));
    for host in HOSTS {
        collected(&admin, host, "version 6, the index lost");
    }

    // The index restored from before a publish (as another publisher's state would be):
    // `current` is not the one it saw, so it lists before it collects, and the version it
    // never saw is a kept version like any other.
    let saved = t.store.state.join(".bento/s3-index.saved");
    fs::create_dir_all(&saved).unwrap();
    for host in HOSTS {
        fs::copy(
            index_path(&t.store.state, host),
            saved.join(format!("{host}.json")),
        )
        .unwrap();
    }
    write_version(&t.sshd, "7");
    publish(&t);
    for host in HOSTS {
        fs::copy(
            saved.join(format!("{host}.json")),
            index_path(&t.store.state, host),
        )
        .unwrap();
    }
    write_version(&t.sshd, "8");
    t.relay.reset();
    publish(&t);
    assert_eq!(listings(&t), HOSTS.len(), "{:?}", t.relay.requests());
    for host in HOSTS {
        collected(&admin, host, "version 8, the index restored from version 6");
    }
}
