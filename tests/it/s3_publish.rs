//! The publisher over an object store (`[server] store = "s3://…{host}…"`), SeaweedFS
//! configured from what `bento server s3-policy --engine seaweedfs` prints: `bento publish`
//! writes the host's prefix with the chroot's keys, the real agent (with only the host's
//! printed rights) applies it and reports, `bento status` and `bento log` read the reports
//! through the store, `bento rollback` goes back, `bento server check` names the guard, and a
//! credentials file inside the fleet repo is refused.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use bento::protocol::report::{Outcome, Report};
use bento::sys::s3::{Client, Credentials, Got, Options, PutMode, S3Error};

use crate::agent::{code, fleet, text, write_version, Machine, EXIT_UPDATED};
use crate::common::bento;
use crate::common::engines::{Garage, Identity, SeaweedFs, GARAGE_REGION};
use crate::common::sshd::Sshd;
use crate::s3_agent::{credentials_file, s3_config};

const BUCKET: &str = "fleet";

pub(crate) fn read(admin: &Client, key: &str) -> Option<Vec<u8>> {
    match admin.get(BUCKET, key, 16 << 20, None).unwrap() {
        Got::Body { bytes, .. } => Some(bytes),
        _ => None,
    }
}

pub(crate) fn run(fleet: &Path, args: &[&str]) -> Output {
    bento()
        .args(args)
        .arg("--fleet")
        .arg(fleet)
        .output()
        .expect("run bento")
}

pub(crate) fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// bento.toml's `[server]` with the store, the credentials file and the state added.
pub(crate) fn point_at_store(fleet: &Path, endpoint: &str, creds: &Path, state: &Path) {
    let store = format!("s3://{BUCKET}/hosts/{{host}}?endpoint={endpoint}&region=us-east-1");
    point_at(fleet, &store, None, creds, state);
}

pub(crate) fn point_at(
    fleet: &Path,
    store: &str,
    reports: Option<&str>,
    creds: &Path,
    state: &Path,
) {
    let toml = fleet.join("bento.toml");
    let text = fs::read_to_string(&toml).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("store =")
            || line.starts_with("reports =")
            || line.starts_with("s3_credentials =")
            || line.starts_with("state =")
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line == "[server]" {
            out.push_str(&format!(
                "store = \"{store}\"\ns3_credentials = \"{}\"\nstate = \"{}\"\n",
                creds.display(),
                state.display()
            ));
            if let Some(r) = reports {
                out.push_str(&format!("reports = \"{r}\"\n"));
            }
        }
    }
    fs::write(&toml, out).unwrap();
}

/// A fleet repo whose store is a SeaweedFS started with exactly the identities `bento server
/// s3-policy --engine seaweedfs` printed for it (so the printed policy is what the tests
/// prove sufficient), the publisher's state and credentials outside the repo.
pub(crate) struct OnSeaweed {
    pub(crate) engine: SeaweedFs,
    pub(crate) ids: Vec<Identity>,
    pub(crate) state: PathBuf,
    creds: PathBuf,
    _outside: tempfile::TempDir,
}

impl OnSeaweed {
    /// Prints the policy for `fleet`'s hosts, starts the engine with it and points the
    /// publisher at the engine.
    pub(crate) fn start(fleet: &Path) -> Self {
        let outside = tempfile::tempdir().unwrap();
        let state = outside.path().join("state");
        let creds = outside.path().join("publisher-credentials");
        // The policy is printed from bento.toml's store, which must name one first.
        point_at_store(fleet, "http://127.0.0.1:1", &creds, &state);
        let ids = identities(&ok(run(
            fleet,
            &["server", "s3-policy", "--engine", "seaweedfs"],
        )));
        let engine = SeaweedFs::start(BUCKET, &ids, None);
        credentials_file(&creds, &engine.admin);
        point_at_store(fleet, &engine.endpoint, &creds, &state);
        OnSeaweed {
            engine,
            ids,
            state,
            creds,
            _outside: outside,
        }
    }

    /// Points the publisher at `endpoint` (a relay or a fault injector in front of the
    /// engine) instead of the engine itself.
    pub(crate) fn publish_through(&self, fleet: &Path, endpoint: &str) {
        point_at_store(fleet, endpoint, &self.creds, &self.state);
    }

    /// The identity printed for `host`.
    pub(crate) fn identity(&self, host: &str) -> &Identity {
        self.ids
            .iter()
            .find(|i| i.actions.iter().any(|a| a.contains(&format!("/{host}/"))))
            .expect("an identity per host")
    }

    /// Gives `m`'s agent the store at `endpoint` with only its host's printed rights.
    pub(crate) fn agent(&self, m: &Machine<'_>, endpoint: &str, extra: &str) {
        let creds = m.base.join("s3-credentials");
        credentials_file(&creds, &self.identity(&m.host).creds);
        s3_config(m, endpoint, &creds, extra);
    }
}

/// The identities `bento server s3-policy --engine seaweedfs` printed.
pub(crate) fn identities(json: &str) -> Vec<Identity> {
    let v: serde_json::Value = serde_json::from_str(json).expect("identities JSON");
    v["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| Identity {
            name: i["name"].as_str().unwrap().to_owned(),
            creds: Credentials {
                access_key: i["credentials"][0]["accessKey"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                secret_key: i["credentials"][0]["secretKey"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                session_token: None,
            },
            actions: i["actions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect(),
        })
        .collect()
}

#[test]
fn s3_publish_update_status_log_rollback_on_seaweedfs_from_the_printed_policy() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let f = sshd.fleet();
    let outside = tempfile::tempdir().unwrap();
    let state = outside.path().join("state");
    let creds = outside.path().join("publisher-credentials");

    // The policy first (the endpoint is not known yet: the rights do not depend on it).
    point_at_store(&f, "http://127.0.0.1:1", &creds, &state);
    let policy = ok(run(&f, &["server", "s3-policy", "--engine", "seaweedfs"]));
    let ids = identities(&policy);
    assert_eq!(
        ids.len(),
        1,
        "one identity per host (no publisher credentials yet)"
    );
    assert_eq!(
        ids[0].actions,
        [
            "Read:fleet/hosts/alpha/*",
            "List:fleet/hosts/alpha/*",
            "Write:fleet/hosts/alpha/logs/*"
        ]
    );
    assert!(state.join(".bento/s3-keys/alpha.age").is_file(), "sealed");
    let engine = SeaweedFs::start(BUCKET, &ids, None);
    let admin = engine.admin_client();
    credentials_file(&creds, &engine.admin);
    point_at_store(&f, &engine.endpoint, &creds, &state);

    // A credentials file inside the fleet repo is refused, naming it, before any request.
    let inside = f.join("s3-credentials");
    credentials_file(&inside, &engine.admin);
    point_at_store(&f, &engine.endpoint, &inside, &state);
    let out = run(&f, &["publish", "--no-eval"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("inside the fleet repo"),
        "{}",
        text(&out)
    );
    fs::remove_file(&inside).unwrap();
    point_at_store(&f, &engine.endpoint, &creds, &state);

    let check = ok(run(&f, &["server", "check"]));
    assert!(check.contains("compare-and-swap"), "{check}");

    ok(run(&f, &["publish", "--no-eval"]));
    let current = read(&admin, "hosts/alpha/current").expect("current published");
    let digest = String::from_utf8(current).unwrap().trim().to_owned();
    // The chroot's keys: the manifest under its digest, its objects under theirs.
    let manifest = read(&admin, &format!("hosts/alpha/manifests/{digest}.json")).expect("manifest");
    assert_eq!(
        bento::protocol::manifest::Digest::of(&manifest).to_string(),
        digest
    );
    let objects = admin.list(BUCKET, "hosts/alpha/objects/").unwrap();
    assert!(!objects.is_empty(), "objects published");

    // The agent with only the printed rights applies it and reports.
    let m = Machine::new(&sshd, "alpha", "");
    let host_creds = m.base.join("s3-credentials");
    credentials_file(&host_creds, &ids[0].creds);
    s3_config(&m, &engine.endpoint, &host_creds, "");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let report =
        Report::parse(&read(&admin, "hosts/alpha/logs/latest.json").expect("latest")).unwrap();
    assert_eq!(report.outcome, Outcome::Success);
    assert_eq!(report.version.to_string(), digest);

    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&ok(run(&f, &["status", "--json"]))).unwrap();
    let alpha = rows.iter().find(|r| r["host"] == "alpha").expect("alpha");
    assert_eq!(alpha["state"], "up-to-date", "{alpha}");
    let log = ok(run(&f, &["log", "alpha"]));
    assert!(log.contains(&digest[..12]), "{log}");

    // A second version, then a rollback to the first: a new live version, whole.
    write_version(&sshd, "2");
    ok(run(&f, &["publish", "--no-eval"]));
    let second = String::from_utf8(read(&admin, "hosts/alpha/current").unwrap()).unwrap();
    assert_ne!(second.trim(), digest);
    ok(run(&f, &["rollback", "alpha", "--to", &digest[..12]]));
    let back = String::from_utf8(read(&admin, "hosts/alpha/current").unwrap()).unwrap();
    assert_ne!(back.trim(), second.trim(), "rolled back");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let system = m.profile_target().unwrap();
    assert!(system.contains("nixos-system-alpha-1"), "{system}");
}

#[test]
fn s3_bucket_per_host_on_garage_from_the_printed_commands_warns_that_only_the_lock_guards() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let f = sshd.fleet();
    let outside = tempfile::tempdir().unwrap();
    let state = outside.path().join("state");
    let creds = outside.path().join("publisher-credentials");
    let engine = Garage::start();
    let publisher = engine.create_key("publisher");
    credentials_file(&creds, &publisher);
    let at = |bucket: &str| {
        format!(
            "s3://{bucket}?endpoint={}&region={GARAGE_REGION}",
            engine.endpoint
        )
    };
    let (store, reports) = (at("bento-{host}"), at("bento-reports-{host}"));
    point_at(&f, &store, Some(&reports), &creds, &state);

    let commands = ok(run(&f, &["server", "s3-policy", "--engine", "garage"]));
    for line in commands
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let args: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(args[0], "garage", "{line}");
        engine.cli_when_ready(&args[1..]);
    }
    let host_creds = Credentials::load(&state.join(".bento/s3-keys/alpha")).unwrap();

    // Garage accepts conditional writes and ignores them: the check says the lock guards.
    let out = run(&f, &["server", "check"]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("publisher's lock"), "{shown}");
    assert!(shown.contains("warning"), "{shown}");

    ok(run(&f, &["publish", "--no-eval"]));
    let alpha = engine.client(&host_creds, &Options::default());
    let current = match alpha.get("bento-alpha", "current", 4096, None).unwrap() {
        Got::Body { bytes, .. } => bytes,
        other => panic!("{other:?}"),
    };
    // The host's key reads its bucket and writes its reports, and nothing else.
    alpha
        .put(
            "bento-reports-alpha",
            "heartbeat.json",
            b"{}",
            PutMode::Overwrite,
        )
        .unwrap();
    let refused = alpha.put("bento-alpha", "current", b"x", PutMode::Overwrite);
    assert!(
        matches!(refused, Err(S3Error::Refused { status: 403, .. })),
        "{refused:?}"
    );
    let unchanged = match alpha.get("bento-alpha", "current", 4096, None).unwrap() {
        Got::Body { bytes, .. } => bytes,
        other => panic!("{other:?}"),
    };
    assert_eq!(unchanged, current);

    // The agent over the bucket-per-host layout with its reports bucket.
    let m = Machine::new(&sshd, "alpha", "");
    let agent_creds = m.base.join("s3-credentials");
    credentials_file(&agent_creds, &host_creds);
    std::fs::write(
        m.config(),
        format!(
            "host = \"alpha\"\nserver = \"{}\"\nreports = \"{}\"\ncredentials_file = \"{}\"\nstate_dir = \"{base}/state\"\nprofile = \"{base}/profiles/system\"\ncurrent_system = \"{base}/no-current-system\"\nfiles_root = \"{base}/root\"\nconnect_timeout = \"5s\"\nconfirm_timeout = \"10s\"\nstall_timeout = \"20s\"\n",
            at("bento-alpha"),
            at("bento-reports-alpha"),
            agent_creds.display(),
            base = m.base.display(),
        ),
    )
    .unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&ok(run(&f, &["status", "--json"]))).unwrap();
    let row = rows.iter().find(|r| r["host"] == "alpha").expect("alpha");
    assert_eq!(row["state"], "up-to-date", "{row}");
}

/// A publisher's view of the engine with its own (local) state, so its lock guards nothing
/// the other takes: only the engine's compare-and-swap can keep them apart.
fn publisher(engine: &SeaweedFs, state: &Path) -> bento::server::store::S3Store {
    use bento::server::store::{Cas, S3Store};
    let files = format!(
        "s3://{BUCKET}/hosts/{{host}}?endpoint={}&region=us-east-1",
        engine.endpoint
    )
    .parse()
    .unwrap();
    let alpha = bento::protocol::HostName::new("alpha").unwrap();
    S3Store::new(
        engine.admin_client(),
        files,
        None,
        bento::protocol::layout::Chroot::new(state),
        vec![alpha],
    )
    .with_cas(Cas::Unknown)
}

#[test]
fn s3_two_publishers_racing_on_seaweedfs_switch_current_at_most_once_per_round() {
    use bento::protocol::manifest::Digest;
    use bento::server::store::{Cas, Store, StoreError};
    let engine = SeaweedFs::start(BUCKET, &[], None);
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (
        publisher(&engine, &tmp.path().join("a")),
        publisher(&engine, &tmp.path().join("b")),
    );
    let alpha = bento::protocol::HostName::new("alpha").unwrap();
    // The probe finds SeaweedFS honours conditional writes.
    assert_eq!(a.probe().unwrap(), Cas::Honoured);
    assert_eq!(b.probe().unwrap(), Cas::Honoured);
    let mut live = None;
    for round in 0..5u8 {
        // Both read the same version, then both switch from it.
        let seen_a = a.current(&alpha).unwrap().map(|(_, v)| v);
        let seen_b = b.current(&alpha).unwrap().map(|(_, v)| v);
        assert_eq!(seen_a, seen_b);
        let (da, db) = (Digest::of(&[b'a', round]), Digest::of(&[b'b', round]));
        let ra = a.switch_current(&alpha, &da, seen_a.as_ref());
        let rb = b.switch_current(&alpha, &db, seen_b.as_ref());
        let won: Vec<&Digest> = [(&ra, &da), (&rb, &db)]
            .into_iter()
            .filter(|(r, _)| r.is_ok())
            .map(|(_, d)| d)
            .collect();
        assert_eq!(
            won.len(),
            1,
            "round {round}: exactly one switch ({ra:?}, {rb:?})"
        );
        let lost = if ra.is_ok() { rb } else { ra };
        assert!(
            matches!(lost, Err(StoreError::Raced { .. })),
            "round {round}: {lost:?}"
        );
        let (bytes, _) = a.current(&alpha).unwrap().unwrap();
        let now = String::from_utf8(bytes).unwrap();
        assert_eq!(
            now.trim(),
            won[0].to_string(),
            "the winner's digest is live"
        );
        assert_ne!(live.as_ref(), Some(&now));
        live = Some(now);
    }
}

/// Issue #27: the freshness stamp goes through the Store seam: `bento publish` puts
/// `manifests/<digest>.fresh` into the object store beside the manifest, `--refresh` re-signs
/// it there and writes nothing else, and the agent with only the host's printed rights reads
/// and accepts it.
#[test]
fn s3_publish_and_refresh_write_the_freshness_stamp_on_seaweedfs() {
    use bento::protocol::freshness::FreshStamp;
    let sshd = Sshd::start(&["alpha"]);
    let key = sshd.dir.join("signing/key");
    let public = crate::signing::keygen(&key);
    crate::signing::set_signing_key(&sshd, &key);
    fleet(&sshd);
    let f = sshd.fleet();
    let store = OnSeaweed::start(&f);
    let admin = store.engine.admin_client();
    let toml = f.join("bento.toml");
    let with_window = fs::read_to_string(&toml).unwrap().replacen(
        "[server]\n",
        "[server]\nfreshness = \"7d\"\n",
        1,
    );
    fs::write(&toml, with_window).unwrap();

    ok(run(&f, &["publish", "--no-eval"]));
    let current = read(&admin, "hosts/alpha/current").expect("current published");
    let digest: bento::protocol::manifest::Digest = String::from_utf8(current.clone())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let trusted = bento::protocol::signing::parse_trusted(std::slice::from_ref(&public)).unwrap();
    let alpha = bento::protocol::HostName::new("alpha").unwrap();
    let stamp_key = format!("hosts/alpha/manifests/{digest}.fresh");
    let stamp = |bytes: Vec<u8>| {
        FreshStamp::parse_untrusted(&bytes, &alpha, &digest, Some(&trusted)).unwrap()
    };
    let first = stamp(read(&admin, &stamp_key).expect("the stamp is in the store"));

    // Stamps have whole seconds: wait (bounded) for the clock to pass the publish's second.
    let published = first.not_after.system_time() - std::time::Duration::from_secs(7 * 86_400);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::SystemTime::now() < published + std::time::Duration::from_secs(1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the clock did not move"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let manifests_before = admin.list(BUCKET, "hosts/alpha/manifests/").unwrap().len();
    ok(run(&f, &["publish", "--refresh"]));
    let second = stamp(read(&admin, &stamp_key).unwrap());
    assert!(second.not_after > first.not_after, "{first:?} → {second:?}");
    assert_eq!(read(&admin, "hosts/alpha/current").unwrap(), current);
    assert_eq!(
        admin.list(BUCKET, "hosts/alpha/manifests/").unwrap().len(),
        manifests_before
    );

    // The agent reads it with the host's own rights, and checks it with its trusted key.
    let m = Machine::new(&sshd, "alpha", &format!("trusted_keys = [\"{public}\"]\n"));
    store.agent(&m, &store.engine.endpoint, "");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert_eq!(
        m.state()["fresh"]["not_after"],
        second.not_after.as_str(),
        "{}",
        m.state()
    );
}
