//! The isolation matrix on Garage's bucket-per-host layout, the engine configured from
//! exactly what `bento server s3-policy --engine garage` prints (and on SeaweedFS's
//! prefix-per-host layout from its printed identities): a host's key reads and lists
//! its own bucket and writes its own reports bucket, and is refused everything else (another
//! host's files and reports, its own `current`, `manifests/`, `objects/`, `cache/`); a
//! request without a key or with an unknown one is refused; the host's agent updates and
//! reports with only those rights. The same matrix runs on SeaweedFS's prefix-per-host
//! layout from the printed identities.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use bento::sys::s3::{Client, Credentials, Got, Options, PutMode, S3Error};

use crate::agent::{code, fleet, text, Machine, EXIT_UPDATED};
use crate::common::engines::{Garage, GARAGE_REGION};
use crate::common::sshd::Sshd;
use crate::s3_agent::credentials_file;
use crate::s3_publish::{ok, point_at, run};

/// A refusal: the engine answered 403, nothing else (a transport error or a 404 would hide
/// whether the right exists).
fn refused<T: std::fmt::Debug>(r: Result<T, S3Error>, what: &str) {
    match r {
        Err(S3Error::Refused { status: 403, .. }) => {}
        other => panic!("{what}: expected 403, got {other:?}"),
    }
}

fn body(c: &Client, bucket: &str, key: &str) -> Vec<u8> {
    match c.get(bucket, key, 1 << 20, None).unwrap() {
        Got::Body { bytes, .. } => bytes,
        other => panic!("{bucket}/{key}: {other:?}"),
    }
}

/// One request with no signature at all (an anonymous client): its HTTP status.
fn anonymous(endpoint: &str, method: &str, path: &str, payload: &[u8]) -> u16 {
    let addr = endpoint.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    )
    .unwrap();
    s.write_all(payload).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let head = String::from_utf8_lossy(&answer);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status in {head:?}"))
}

/// agent.toml for the bucket-per-host layout: files in `bento-<host>`, reports in
/// `bento-reports-<host>`.
fn garage_agent(m: &Machine<'_>, endpoint: &str, creds: &Path) {
    let at = |bucket: &str| format!("s3://{bucket}?endpoint={endpoint}&region={GARAGE_REGION}");
    std::fs::write(
        m.config(),
        format!(
            "host = \"{host}\"\nserver = \"{files}\"\nreports = \"{reports}\"\ncredentials_file = \"{creds}\"\nstate_dir = \"{base}/state\"\nprofile = \"{base}/profiles/system\"\ncurrent_system = \"{base}/no-current-system\"\nfiles_root = \"{base}/root\"\nconnect_timeout = \"5s\"\nconfirm_timeout = \"10s\"\nstall_timeout = \"20s\"\n",
            host = m.host,
            files = at(&format!("bento-{}", m.host)),
            reports = at(&format!("bento-reports-{}", m.host)),
            creds = creds.display(),
            base = m.base.display(),
        ),
    )
    .unwrap();
}

/// Where a host's keys are in one layout: `(bucket, key)` of its files and of its reports.
struct Layout {
    files: fn(&str, &str) -> (String, String),
    reports: fn(&str, &str) -> (String, String),
}

/// Garage: a bucket per host and a reports bucket per host.
const BUCKET_PER_HOST: Layout = Layout {
    files: |h, k| (format!("bento-{h}"), k.to_owned()),
    reports: |h, k| (format!("bento-reports-{h}"), k.to_owned()),
};

/// SeaweedFS: a prefix per host in one bucket, reports under its `logs/`.
const PREFIX_PER_HOST: Layout = Layout {
    files: |h, k| ("fleet".to_owned(), format!("hosts/{h}/{k}")),
    reports: |h, k| ("fleet".to_owned(), format!("hosts/{h}/logs/{k}")),
};

/// The matrix for host alpha's key after a publish of alpha and beta: what it may do, and
/// every refusal. `client` makes a client for a key, `endpoint` is the engine's.
fn matrix(
    l: &Layout,
    client: &dyn Fn(&Credentials) -> Client,
    endpoint: &str,
    alpha_key: &Credentials,
    beta_key: &Credentials,
) {
    let (files, reports) = (l.files, l.reports);
    // Something in beta's reports, written with beta's own key.
    let beta = client(beta_key);
    let (rb, rk) = reports("beta", "heartbeat.json");
    beta.put(&rb, &rk, b"{}", PutMode::Overwrite).unwrap();
    let (fb, fk) = files("beta", "current");
    let beta_current = body(&beta, &fb, &fk);
    let beta_manifest = files(
        "beta",
        &format!(
            "manifests/{}.json",
            String::from_utf8_lossy(&beta_current).trim()
        ),
    );

    // A fresh client per refused request: after refusing a write, Garage may close the
    // connection without reading the body, and a client that reuses it sees "Peer
    // disconnected" instead of the next answer (docs/objectstore.md, failure modes).
    let alpha = client(alpha_key);
    let fresh = || client(alpha_key);
    // What alpha may do.
    let (ab, ak) = files("alpha", "current");
    let own_current = body(&alpha, &ab, &ak);
    let (ob, op) = files("alpha", "");
    let own = alpha.list(&ob, &op).unwrap();
    assert!(own.iter().any(|x| x.key == ak), "{own:?}");
    assert!(
        own.iter()
            .any(|x| x.key.starts_with(&files("alpha", "objects/").1)),
        "{own:?}"
    );
    let (rb, rk) = reports("alpha", "heartbeat.json");
    alpha.put(&rb, &rk, b"{}", PutMode::Overwrite).unwrap();

    // Nothing of beta's: its files, its listing, its reports, for reading or writing.
    let (b, k) = files("beta", "current");
    refused(alpha.get(&b, &k, 4096, None), "read beta's current");
    refused(alpha.head(&b, &k), "HEAD beta's current");
    refused(
        alpha.get(&beta_manifest.0, &beta_manifest.1, 1 << 20, None),
        "read beta's manifest",
    );
    let (b, p) = files("beta", "");
    refused(alpha.list(&b, &p), "list beta's files");
    let (b, k) = reports("beta", "heartbeat.json");
    refused(alpha.get(&b, &k, 4096, None), "read beta's reports");
    let (b, p) = reports("beta", "");
    refused(alpha.list(&b, &p), "list beta's reports");
    for key in ["current", "manifests/x.json", "objects/x", "cache/x"] {
        let (b, k) = files("beta", key);
        refused(
            fresh().put(&b, &k, b"x", PutMode::Overwrite),
            &format!("write beta's {key}"),
        );
    }
    let (b, k) = reports("beta", "latest.json");
    refused(
        fresh().put(&b, &k, b"{}", PutMode::Overwrite),
        "write beta's reports",
    );
    let (b, k) = files("beta", "current");
    refused(fresh().delete(&b, &k), "delete beta's current");
    let (sb, sk) = reports("alpha", "heartbeat.json");
    refused(fresh().copy(&sb, &sk, &b, &k), "copy over beta's current");
    // Nothing that changes what its own machine applies.
    for key in [
        "current",
        "manifests/x.json",
        "manifests/x.sig",
        "objects/x",
        "cache/x",
    ] {
        let (b, k) = files("alpha", key);
        refused(
            fresh().put(&b, &k, b"x", PutMode::Overwrite),
            &format!("write its own {key}"),
        );
    }
    refused(fresh().delete(&ab, &ak), "delete its own current");
    refused(
        fresh().copy(&sb, &sk, &ab, &ak),
        "copy over its own current",
    );
    assert_eq!(body(&alpha, &ab, &ak), own_current);
    assert_eq!(body(&beta, &fb, &fk), beta_current);

    // Without a valid key: an unknown key, and no signature at all.
    let nobody = client(&Credentials {
        access_key: "GK0123456789abcdef01234567".into(),
        secret_key: "0".repeat(64),
        session_token: None,
    });
    refused(nobody.get(&ab, &ak, 4096, None), "unknown key reads");
    refused(nobody.list(&ob, &op), "unknown key lists");
    let (rb, rk) = reports("alpha", "heartbeat.json");
    for (method, path) in [
        ("GET", format!("/{ab}/{ak}")),
        ("GET", format!("/{ob}?list-type=2&prefix={op}")),
        ("GET", format!("/{rb}/{rk}")),
        ("PUT", format!("/{ab}/{ak}")),
        (
            "PUT",
            format!("/{rb}/{}", reports("alpha", "latest.json").1),
        ),
    ] {
        let status = anonymous(endpoint, method, &path, b"x");
        assert_eq!(status, 403, "anonymous {method} {path}");
    }
    assert_eq!(body(&alpha, &ab, &ak), own_current);
}

/// What a user relies on when one machine is stolen or compromised on Garage: its key,
/// provisioned by the printed commands, cannot read, list or write any other host's bucket
/// or reports, cannot change what its own machine will apply, and a request without valid
/// credentials gets nothing; yet those rights are enough for the agent to update and report.
#[test]
fn s3_isolation_matrix_on_garage_from_the_printed_commands() {
    let sshd = Sshd::start(&["alpha", "beta"]);
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
    point_at(
        &f,
        &at("bento-{host}"),
        Some(&at("bento-reports-{host}")),
        &creds,
        &state,
    );
    let commands = ok(run(&f, &["server", "s3-policy", "--engine", "garage"]));
    for line in commands
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let args: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(args[0], "garage", "{line}");
        engine.cli_when_ready(&args[1..]);
    }
    let key_of = |h: &str| Credentials::load(&state.join(format!(".bento/s3-keys/{h}"))).unwrap();
    let (alpha_key, beta_key) = (key_of("alpha"), key_of("beta"));
    assert_ne!(alpha_key.access_key, beta_key.access_key);
    ok(run(&f, &["publish", "--no-eval"]));

    matrix(
        &BUCKET_PER_HOST,
        &|c| engine.client(c, &Options::default()),
        &engine.endpoint,
        &alpha_key,
        &beta_key,
    );

    // With only those rights the agent updates and reports, and status reads the report.
    let m = Machine::new(&sshd, "alpha", "");
    let agent_creds = m.base.join("s3-credentials");
    credentials_file(&agent_creds, &alpha_key);
    garage_agent(&m, &engine.endpoint, &agent_creds);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(m.profile_target().unwrap().contains("nixos-system-alpha-1"));
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&ok(run(&f, &["status", "--json"]))).unwrap();
    let row = rows.iter().find(|r| r["host"] == "alpha").expect("alpha");
    assert_eq!(row["state"], "up-to-date", "{row}");
}

/// The same matrix on SeaweedFS's prefix-per-host layout, the engine started with exactly
/// the identities `bento server s3-policy --engine seaweedfs` printed.
#[test]
fn s3_isolation_matrix_on_seaweedfs_from_the_printed_identities() {
    let sshd = Sshd::start(&["alpha", "beta"]);
    fleet(&sshd);
    let f = sshd.fleet();
    let store = crate::s3_publish::OnSeaweed::start(&f);
    let engine = &store.engine;
    ok(run(&f, &["publish", "--no-eval"]));
    let key_of = |h: &str| store.identity(h).creds.clone();

    matrix(
        &PREFIX_PER_HOST,
        &|c| engine.client(c, &Options::default()),
        &engine.endpoint,
        &key_of("alpha"),
        &key_of("beta"),
    );

    let m = Machine::new(&sshd, "alpha", "");
    store.agent(&m, &engine.endpoint, "");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&ok(run(&f, &["status", "--json"]))).unwrap();
    let row = rows.iter().find(|r| r["host"] == "alpha").expect("alpha");
    assert_eq!(row["state"], "up-to-date", "{row}");
}
