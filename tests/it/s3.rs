//! The S3 client (`sys::s3`) against real engines: SeaweedFS and Garage started per test on
//! loopback. Every operation bento needs, conditional writes honoured (SeaweedFS) or detected
//! as ignored (Garage), a clock an hour off corrected from the engine's `Date`, a TLS endpoint
//! pinned by `ca_file`, and a host identity held to its rights.

use std::time::Duration;

use bento::sys::s3::{Client, Got, Options, PutMode, S3Error};

use crate::common::engines::{Garage, Identity, SeaweedFs, TestCa, GARAGE_REGION};

const BUCKET: &str = "fleet";

/// Every operation, on `client`, under `prefix` of `bucket`.
fn exercise(client: &Client, bucket: &str, prefix: &str) {
    let key = |k: &str| format!("{prefix}{k}");
    // PUT and bounded GET.
    let etag = client
        .put(bucket, &key("current"), b"abc\n", PutMode::Overwrite)
        .unwrap()
        .expect("an ETag");
    match client.get(bucket, &key("current"), 4, None).unwrap() {
        Got::Body { bytes, etag: e, .. } => {
            assert_eq!(bytes, b"abc\n");
            assert_eq!(e.as_deref(), Some(etag.as_str()));
        }
        other => panic!("{other:?}"),
    }
    let e = client.get(bucket, &key("current"), 3, None).unwrap_err();
    assert!(matches!(e, S3Error::TooLarge { limit: 3, .. }), "{e}");
    assert!(e.to_string().contains(&key("current")), "{e}");
    // Conditional GET: unchanged costs no body.
    assert_eq!(
        client.get(bucket, &key("current"), 4, Some(&etag)).unwrap(),
        Got::NotModified
    );
    assert_eq!(
        client.get(bucket, &key("missing"), 4, None).unwrap(),
        Got::NotFound
    );
    // HEAD.
    let head = client.head(bucket, &key("current")).unwrap().unwrap();
    assert_eq!(head.size, 4);
    assert!(client.head(bucket, &key("missing")).unwrap().is_none());
    // Ranged GET (resume), appended to what is there.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    client
        .put(bucket, &key("objects/big"), &data, PutMode::Overwrite)
        .unwrap();
    let mut out = data[..1000].to_vec();
    let n = client
        .get_range(bucket, &key("objects/big"), 1000, 1_000_000, &mut out)
        .unwrap();
    assert_eq!(n, Some(99_000));
    assert_eq!(out, data);
    let mut none = Vec::new();
    assert_eq!(
        client
            .get_range(bucket, &key("objects/gone"), 0, 10, &mut none)
            .unwrap(),
        None
    );
    // Server-side copy.
    client
        .copy(bucket, &key("objects/big"), bucket, &key("objects/copy"))
        .unwrap();
    assert_eq!(
        client
            .head(bucket, &key("objects/copy"))
            .unwrap()
            .unwrap()
            .size,
        100_000
    );
    // Listing with the trailing slash, over several pages.
    for i in 0..5 {
        client
            .put(
                bucket,
                &key(&format!("logs/reports/{i}.json")),
                b"{}",
                PutMode::Overwrite,
            )
            .unwrap();
    }
    let listed = client.list_paged(bucket, &key("logs/reports/"), 2).unwrap();
    let names: Vec<&str> = listed.iter().map(|l| l.key.as_str()).collect();
    let want: Vec<String> = (0..5)
        .map(|i| key(&format!("logs/reports/{i}.json")))
        .collect();
    assert_eq!(names, want);
    let all = client.list(bucket, prefix).unwrap();
    assert_eq!(all.len(), 8, "{all:?}");
    // DELETE (twice: a key already gone is fine).
    client.delete(bucket, &key("objects/copy")).unwrap();
    client.delete(bucket, &key("objects/copy")).unwrap();
    assert!(client.head(bucket, &key("objects/copy")).unwrap().is_none());
}

/// What the server's probe does: a conditional write with a stale ETag. `true` when the
/// engine honoured it (412), `false` when the second write succeeded (headers ignored).
fn honours_conditional_writes(client: &Client, bucket: &str, key: &str) -> bool {
    let first = client
        .put(bucket, key, b"1", PutMode::Overwrite)
        .unwrap()
        .unwrap();
    client.put(bucket, key, b"2", PutMode::Overwrite).unwrap();
    match client.put(bucket, key, b"3", PutMode::Replace(&first)) {
        Err(S3Error::PreconditionFailed { .. }) => true,
        Ok(_) => false,
        Err(e) => panic!("probe: {e}"),
    }
}

/// A client whose clock is `offset` seconds off still gets through, and knows the offset.
fn survives_skew(client: &Client, bucket: &str, key: &str, forced: i64) {
    client
        .put(bucket, key, b"skewed", PutMode::Overwrite)
        .unwrap_or_else(|e| panic!("clock {forced:+} s: {e}"));
    let fixed = client.clock_correction().expect("the clock was corrected");
    assert!(
        fixed.abs() <= bento::sys::s3::TOLERANCE_SECS,
        "forced {forced:+} s, corrected to {fixed:+} s"
    );
    assert!(matches!(
        client.get(bucket, key, 100, None).unwrap(),
        Got::Body { .. }
    ));
}

#[test]
fn s3_client_against_seaweedfs() {
    let engine = SeaweedFs::start(BUCKET, &[], None);
    let admin = engine.admin_client();
    exercise(&admin, BUCKET, "hosts/alpha/");

    // Conditional writes honoured: a lost race is a typed error, and creating an existing
    // key fails the same way.
    assert!(honours_conditional_writes(&admin, BUCKET, "probe/cas"));
    let e = admin
        .put(BUCKET, "probe/cas", b"x", PutMode::Create)
        .unwrap_err();
    assert!(matches!(e, S3Error::PreconditionFailed { .. }), "{e}");
    let etag = admin
        .head(BUCKET, "probe/cas")
        .unwrap()
        .unwrap()
        .etag
        .unwrap();
    admin
        .put(BUCKET, "probe/cas", b"4", PutMode::Replace(&etag))
        .unwrap();
    admin
        .put(BUCKET, "probe/new", b"x", PutMode::Create)
        .unwrap();

    for forced in [3600, -3600] {
        let c = engine.client(
            &engine.admin,
            &Options {
                clock_offset: forced,
                ..Options::default()
            },
        );
        survives_skew(&c, BUCKET, "probe/skew", forced);
    }
}

#[test]
fn s3_host_identity_on_seaweedfs_has_exactly_its_rights() {
    let alpha = Identity::host(BUCKET, "alpha");
    let engine = SeaweedFs::start(
        BUCKET,
        &[alpha.clone(), Identity::host(BUCKET, "beta")],
        None,
    );
    let admin = engine.admin_client();
    for h in ["alpha", "beta"] {
        admin
            .put(
                BUCKET,
                &format!("hosts/{h}/current"),
                b"x\n",
                PutMode::Overwrite,
            )
            .unwrap();
    }
    let c = engine.client(&alpha.creds, &Options::default());
    assert!(matches!(
        c.get(BUCKET, "hosts/alpha/current", 10, None).unwrap(),
        Got::Body { .. }
    ));
    assert_eq!(c.list(BUCKET, "hosts/alpha/").unwrap().len(), 1);
    c.put(
        BUCKET,
        "hosts/alpha/logs/heartbeat.json",
        b"{}",
        PutMode::Overwrite,
    )
    .unwrap();
    let refused = |r: Result<(), S3Error>, what: &str| match r {
        Err(S3Error::Refused { status: 403, .. }) => {}
        other => panic!("{what}: {other:?}"),
    };
    refused(
        c.get(BUCKET, "hosts/beta/current", 10, None).map(|_| ()),
        "read beta",
    );
    refused(c.list(BUCKET, "hosts/beta/").map(|_| ()), "list beta");
    refused(
        c.put(BUCKET, "hosts/beta/logs/x", b"x", PutMode::Overwrite)
            .map(|_| ()),
        "write beta's logs",
    );
    for own in ["current", "manifests/x.json", "objects/x", "cache/x"] {
        refused(
            c.put(
                BUCKET,
                &format!("hosts/alpha/{own}"),
                b"x",
                PutMode::Overwrite,
            )
            .map(|_| ()),
            own,
        );
    }
    let nobody = bento::sys::s3::Credentials {
        access_key: "nobody".into(),
        secret_key: "nothing".into(),
        session_token: None,
    };
    let anon = engine.client(&nobody, &Options::default());
    refused(
        anon.get(BUCKET, "hosts/alpha/current", 10, None)
            .map(|_| ()),
        "unknown key",
    );
}

#[test]
fn s3_tls_endpoint_pinned_by_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path());
    let engine = SeaweedFs::start(BUCKET, &[], Some(&ca));
    let https = engine.https_endpoint.clone().unwrap();
    let pinned = Client::new(
        &https,
        "us-east-1",
        &engine.admin,
        &Options {
            ca_file: Some(ca.ca_cert.clone()),
            ..Options::default()
        },
    )
    .unwrap();
    pinned
        .put(BUCKET, "tls/current", b"over tls\n", PutMode::Overwrite)
        .unwrap();
    assert!(matches!(
        pinned.get(BUCKET, "tls/current", 100, None).unwrap(),
        Got::Body { .. }
    ));
    // Without the CA, the certificate is not trusted: nothing is sent.
    let unpinned = Client::new(&https, "us-east-1", &engine.admin, &Options::default()).unwrap();
    let e = unpinned.get(BUCKET, "tls/current", 100, None).unwrap_err();
    assert!(matches!(e, S3Error::Transport { .. }), "{e}");
    // A ca_file that holds no certificate is refused by name.
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let e = Client::new(
        &https,
        "us-east-1",
        &engine.admin,
        &Options {
            ca_file: Some(dir.path().join("empty.pem")),
            ..Options::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("empty.pem"), "{e}");
}

/// Garage with bucket-per-host: `bento-alpha` (the host's files) and `bento-reports-alpha`
/// (its reports), an admin key owning both and the host's key reading the first, writing
/// the second.
pub struct GarageFleet {
    pub engine: Garage,
    pub admin: bento::sys::s3::Credentials,
    pub alpha: bento::sys::s3::Credentials,
}

pub fn garage_fleet() -> GarageFleet {
    let engine = Garage::start();
    let admin = engine.create_key("admin");
    let alpha = engine.create_key("alpha");
    for b in ["bento-alpha", "bento-reports-alpha"] {
        engine.cli_when_ready(&["bucket", "create", b]);
        engine.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", b, "--key", "admin",
        ]);
    }
    engine.cli(&["bucket", "allow", "--read", "bento-alpha", "--key", "alpha"]);
    engine.cli(&[
        "bucket",
        "allow",
        "--write",
        "bento-reports-alpha",
        "--key",
        "alpha",
    ]);
    GarageFleet {
        engine,
        admin,
        alpha,
    }
}

#[test]
fn s3_client_against_garage() {
    let fleet = garage_fleet();
    let admin = fleet.engine.client(&fleet.admin, &Options::default());
    exercise(&admin, "bento-alpha", "");
    // Garage 2.x ignores If-Match: the probe sees the stale write succeed.
    assert!(!honours_conditional_writes(
        &admin,
        "bento-alpha",
        "probe-cas"
    ));

    let alpha = fleet.engine.client(&fleet.alpha, &Options::default());
    assert!(matches!(
        alpha.get("bento-alpha", "current", 10, None).unwrap(),
        Got::Body { .. }
    ));
    alpha
        .put(
            "bento-reports-alpha",
            "heartbeat.json",
            b"{}",
            PutMode::Overwrite,
        )
        .unwrap();
    let e = alpha
        .put("bento-alpha", "current", b"x", PutMode::Overwrite)
        .unwrap_err();
    assert!(matches!(e, S3Error::Refused { status: 403, .. }), "{e}");

    for forced in [3600, -3600] {
        let c = fleet.engine.client(
            &fleet.admin,
            &Options {
                clock_offset: forced,
                stall_timeout: Duration::from_secs(30),
                ..Options::default()
            },
        );
        survives_skew(&c, "bento-alpha", "probe-skew", forced);
    }
    let _ = GARAGE_REGION;
}
