//! Mirrors end to end (issue #27): the real agent, the real sshd as `server` (behind a
//! relay the tests take down), real Nix builds of toy systems, and mirrors made by
//! `bento publish --export`: a static HTTPS server on loopback (the test CA), a plain
//! `http://` one, a `file://` copy, and SeaweedFS.

use std::fs;
use std::path::Path;

use bento::protocol::report::{Outcome, Report};

use crate::agent::{
    code, fleet, text, write_version, Machine, EXIT_FAILED, EXIT_NOOP, EXIT_UPDATED,
};
use crate::common::bento;
use crate::common::engines::TestCa;
use crate::common::relay::Relay;
use crate::common::sshd::Sshd;
use crate::common::static_http::StaticHttp;

/// Serves `export` over HTTPS (a CA of the test's own) and makes it `m`'s mirror, trusting
/// that CA.
pub(crate) fn serve_tls(sshd: &Sshd, export: &Path, m: &Machine<'_>) -> StaticHttp {
    let ca = TestCa::create(&sshd.dir.join(""));
    let web = StaticHttp::start_tls(export, &ca.cert, &ca.key);
    m.write_config(&format!(
        "mirrors = [\"{}\"]\nca_file = \"{}\"\n",
        web.url(&m.host),
        ca.ca_cert.display()
    ));
    web
}

/// `bento publish --export DIR` of the fleet (publishing whatever changed first).
pub(crate) fn publish_export(sshd: &Sshd, dir: &Path) {
    let out = bento()
        .args(["publish", "--no-eval", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .arg("--export")
        .arg(dir)
        .output()
        .expect("run bento");
    assert!(
        out.status.success(),
        "bento publish --export failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exported alpha version"), "{err}");
}

fn spooled(m: &Machine<'_>) -> usize {
    fs::read_dir(m.base.join("state/spool"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
        .unwrap_or(0)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn agent_updates_from_an_https_mirror_while_its_server_is_down_and_reports_once_it_is_back() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let relay = Relay::start(sshd.port);
    let m = Machine::new(&sshd, "alpha", "").via(relay.port);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));

    let export = sshd.dir.join("export");
    write_version(&sshd, "2");
    publish_export(&sshd, &export);
    // The copy holds exactly the live tree: no logs/.
    assert!(export.join("alpha/current").is_file());
    assert!(!export.join("alpha/logs").exists());
    let web = serve_tls(&sshd, &export, &m);

    // A download of version 2 that an earlier run cut off halfway: resumed with a Range.
    let have = listing(&m.base.join("state/objects"));
    let new_object = listing(&export.join("alpha/objects"))
        .into_iter()
        .find(|o| !have.contains(o))
        .expect("version 2 adds an object");
    let body = fs::read(export.join("alpha/objects").join(&new_object)).unwrap();
    let half = body.len() / 2;
    assert!(half > 0);
    fs::write(
        m.base
            .join("state/objects")
            .join(format!(".partial-{new_object}")),
        &body[..half],
    )
    .unwrap();

    relay.set_down(true);
    let first = m.latest_report();
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let system = m.profile_target().unwrap();
    assert!(system.contains("nixos-system-alpha-2"), "{system}");
    let resumed = format!("GET /alpha/objects/{new_object} bytes={half}-");
    assert!(
        web.requests().iter().any(|r| r.starts_with(&resumed)),
        "{resumed} in {:?}",
        web.requests()
    );
    assert_eq!(m.activations().len(), 2, "{}", text(&out));
    // The confirmation went through the mirror, so the new system stays.
    assert!(stderr(&out).contains("reached mirror"), "{}", text(&out));
    // The server did not get the report; it waits in the spool, and the mirror was only
    // read (GET and HEAD, nothing else).
    assert_eq!(m.latest_report().id, first.id);
    assert_eq!(spooled(&m), 1);
    let asked = web.requests();
    assert!(
        asked.iter().any(|r| r.starts_with("GET /alpha/objects/")),
        "{asked:?}"
    );
    assert!(
        asked
            .iter()
            .all(|r| r.starts_with("GET ") || r.starts_with("HEAD ")),
        "{asked:?}"
    );

    relay.set_down(false);
    let before = web.requests().len();
    let out = m.update();
    assert_eq!(code(&out), EXIT_NOOP, "{}", text(&out));
    let delivered = m.latest_report();
    assert_eq!(delivered.outcome, Outcome::Success);
    assert_eq!(delivered.system_after.as_deref(), Some(system.as_str()));
    assert_eq!(spooled(&m), 0);
    // With the server up, the no-change poll never asks the mirror anything.
    assert_eq!(web.requests().len(), before);
}

#[test]
fn agent_refuses_a_tampered_mirror_skips_an_older_one_and_follows_the_highest_serial() {
    let sshd = Sshd::start(&["alpha"]);
    let key = sshd.dir.join("signing-key");
    let public = crate::signing::keygen(&key);
    crate::signing::set_signing_key(&sshd, &key);
    fleet(&sshd);
    let relay = Relay::start(sshd.port);
    let m = Machine::new(&sshd, "alpha", "").via(relay.port);
    let trusted = format!("trusted_keys = [\"{}\"]\n", public.trim());
    m.write_config(&trusted);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let v1 = m.profile_target().unwrap();

    // Mirror one, first on the list: a file:// copy of version 1 (serial 1).
    let old = sshd.dir.join("old");
    publish_export(&sshd, &old);
    // Mirror two: plain http on loopback, version 2 (serial 2), one object tampered with.
    let web_dir = sshd.dir.join("web");
    let before: Vec<String> = listing(&old.join("alpha/objects"));
    write_version(&sshd, "2");
    publish_export(&sshd, &web_dir);
    let added: Vec<String> = listing(&web_dir.join("alpha/objects"))
        .into_iter()
        .filter(|o| !before.contains(o))
        .collect();
    assert!(!added.is_empty(), "version 2 adds an object");
    let tampered = web_dir.join("alpha/objects").join(&added[0]);
    let mut bytes = fs::read(&tampered).unwrap();
    bytes.extend_from_slice(b"\n# tampered\n");
    fs::write(&tampered, &bytes).unwrap();
    let web = StaticHttp::start(&web_dir);
    m.write_config(&format!(
        "{trusted}mirrors = [\"file://{}\", \"{}\"]\n",
        old.join("alpha").display(),
        web.url("alpha")
    ));

    // The server down: both mirrors are read, version 2's serial wins, and its tampered
    // object is refused: nothing changes on the machine.
    relay.set_down(true);
    let out = m.update();
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    assert!(stderr(&out).contains("hashes to"), "{}", text(&out));
    assert_eq!(m.activations().len(), 1, "nothing applied");
    assert_eq!(m.profile_target().as_deref(), Some(v1.as_str()));

    // The mirror repaired: version 2 is applied from it (the higher of the two serials).
    fs::remove_file(&tampered).unwrap();
    publish_export(&sshd, &web_dir);
    let out = m.update_with(&[], &["--force"]);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let v2 = m.profile_target().unwrap();
    assert!(v2.contains("nixos-system-alpha-2"), "{v2}");

    // Now the file:// mirror is older than what is applied: skipped with a note, not an
    // error; the http one serves the applied version: nothing to do.
    let out = m.update();
    assert_eq!(code(&out), EXIT_NOOP, "{}", text(&out));
    assert!(
        stderr(&out).contains("older than the applied"),
        "{}",
        text(&out)
    );
    assert_eq!(m.activations().len(), 2);

    // The server back, with version 3: applied from it, and the spooled reports delivered.
    write_version(&sshd, "3");
    sshd.publish();
    relay.set_down(false);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert_eq!(spooled(&m), 0);
    let reports: Vec<Report> = fs::read_dir(m.logs().join("reports"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .map(|e| Report::parse(&fs::read(e.path()).unwrap()).unwrap())
        .collect();
    // Ids order reports by their second only: count them, do not sort them.
    let count = |o: Outcome| reports.iter().filter(|r| r.outcome == o).count();
    assert_eq!(
        (count(Outcome::Success), count(Outcome::Failure)),
        (3, 1),
        "{reports:?}"
    );
}

fn listing(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn agent_updates_from_an_s3_mirror_while_its_server_is_down_and_writes_nothing_there() {
    use crate::common::engines::{Identity, SeaweedFs};
    use crate::s3_agent::{credentials_file, upload, BUCKET};

    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let relay = Relay::start(sshd.port);
    let m = Machine::new(&sshd, "alpha", "").via(relay.port);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));

    // The export, synced into the bucket as `aws s3 sync` would (current last).
    let export = sshd.dir.join("export");
    write_version(&sshd, "2");
    publish_export(&sshd, &export);
    let alpha = Identity::host(BUCKET, "alpha");
    let engine = SeaweedFs::start(BUCKET, std::slice::from_ref(&alpha), None);
    let admin = engine.admin_client();
    upload(&admin, &export.join("alpha"), "hosts/alpha");
    let creds = m.base.join("s3-credentials");
    credentials_file(&creds, &alpha.creds);
    m.write_config(&format!(
        "mirrors = [\"s3://{BUCKET}/hosts/{{host}}?endpoint={}&region=us-east-1\"]\ncredentials_file = \"{}\"\n",
        engine.endpoint,
        creds.display()
    ));

    relay.set_down(true);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let system = m.profile_target().unwrap();
    assert!(system.contains("nixos-system-alpha-2"), "{system}");
    assert_eq!(spooled(&m), 1);
    // A mirror is read, never written: reports go to the server only.
    assert!(admin.list(BUCKET, "hosts/alpha/logs/").unwrap().is_empty());

    relay.set_down(false);
    let out = m.update();
    assert_eq!(code(&out), EXIT_NOOP, "{}", text(&out));
    assert_eq!(spooled(&m), 0);
    assert_eq!(
        m.latest_report().system_after.as_deref(),
        Some(system.as_str())
    );
}

/// The HTTPS source alone: the protocol's size limits, ranged reads that resume a partial
/// file, and a sink that refuses every write without sending one.
#[test]
fn an_https_source_keeps_the_limits_resumes_with_ranges_and_never_writes() {
    use bento::agent::source::{self, Item, LogItem, ObjectPart, RemoteError, ServerUrl};
    use bento::protocol::manifest::Digest;

    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("alpha");
    fs::create_dir_all(tree.join("objects")).unwrap();
    fs::write(tree.join("current"), "a".repeat(5000)).unwrap();
    let body: Vec<u8> = (0..100u8).collect();
    let d = Digest::of(&body);
    fs::write(tree.join("objects").join(d.to_hex()), &body).unwrap();
    let web = StaticHttp::start(dir.path());
    let url: ServerUrl = web.url("alpha").parse().unwrap();
    let opts = source::SshOptions {
        identity_file: "/nonexistent".into(),
        known_hosts: "/nonexistent".into(),
        connect_timeout: std::time::Duration::from_secs(5),
        control_dir: dir.path().join("ssh"),
        stall_timeout: std::time::Duration::from_secs(10),
        deadline: None,
        s3: Default::default(),
    };
    let mut c = source::connect(&url, &opts).unwrap();
    let err = c.read(Item::Current, 4096).unwrap_err();
    assert!(matches!(err, RemoteError::TooLarge { .. }), "{err}");
    assert_eq!(c.size(Item::Object(d)).unwrap(), Some(100));
    assert_eq!(c.size(Item::Object(Digest::of(b"none"))).unwrap(), None);

    let dest = dir.path().join("partial");
    fs::write(&dest, &body[..40]).unwrap();
    let part = ObjectPart {
        item: Item::Object(d),
        from: 40,
        max: 61,
        dest: dest.clone(),
    };
    assert_eq!(c.read_objects(&[part]).unwrap(), 60);
    assert_eq!(fs::read(&dest).unwrap(), body);

    let err = c.put(LogItem::Heartbeat, b"{}").unwrap_err();
    assert!(matches!(err, RemoteError::ReadOnly { .. }), "{err}");
    let asked = web.requests();
    assert!(
        asked.contains(&format!("GET /alpha/objects/{d} bytes=40-100")),
        "{asked:?}"
    );
    assert!(
        asked
            .iter()
            .all(|r| r.starts_with("GET ") || r.starts_with("HEAD ")),
        "{asked:?}"
    );
}

/// A server that stops answering (packets dropped, connections kept open) is left after
/// `stall_timeout`, for the mirror.
#[test]
fn agent_leaves_a_stalled_server_for_a_mirror() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let relay = Relay::start(sshd.port);
    let m = Machine::new(&sshd, "alpha", "").via(relay.port);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));

    let export = sshd.dir.join("export");
    write_version(&sshd, "2");
    publish_export(&sshd, &export);
    let web = StaticHttp::start(&export);
    m.write_config(&format!(
        "mirrors = [\"{}\"]\nstall_timeout = \"3s\"\n",
        web.url("alpha")
    ));

    relay.stall(true);
    let started = std::time::Instant::now();
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(
        m.profile_target().unwrap().contains("nixos-system-alpha-2"),
        "{}",
        text(&out)
    );
    assert!(
        stderr(&out).contains("trying the mirrors"),
        "{}",
        text(&out)
    );
    // Bounded by the stall and connect limits, not by the run's.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(90),
        "{:?}",
        started.elapsed()
    );
    relay.stall(false);
}

/// An `https://` server is read-only: with `reports` beside it, reports and heartbeats go
/// there; without, they stay in the spool and each run says so.
#[test]
fn a_read_only_server_reports_to_its_reports_place_or_spools() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let export = sshd.dir.join("export");
    publish_export(&sshd, &export);
    let web = StaticHttp::start(&export);
    let m = Machine::new(&sshd, "alpha", "");
    let base = m.base.display().to_string();
    let config = |extra: &str| {
        fs::write(
            m.config(),
            format!(
                "host = \"alpha\"\nserver = \"{}\"\nstate_dir = \"{base}/state\"\nprofile = \"{base}/profiles/system\"\ncurrent_system = \"{base}/no-current-system\"\nfiles_root = \"{base}/root\"\nconfirm_timeout = \"3s\"\n{extra}",
                web.url("alpha")
            ),
        )
        .unwrap()
    };
    config("");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert_eq!(spooled(&m), 1);
    assert!(
        stderr(&out).contains("is read-only: reports stay spooled"),
        "{}",
        text(&out)
    );

    let reports = sshd.dir.join("reports");
    fs::create_dir_all(&reports).unwrap();
    config(&format!("reports = \"file://{}\"\n", reports.display()));
    let out = m.update();
    assert_eq!(code(&out), EXIT_NOOP, "{}", text(&out));
    assert_eq!(spooled(&m), 0, "{}", text(&out));
    let latest = Report::parse(&fs::read(reports.join("logs/latest.json")).unwrap()).unwrap();
    assert_eq!(latest.outcome, Outcome::Success);
    assert!(reports.join("logs/heartbeat.json").is_file());
    assert!(
        web.requests()
            .iter()
            .all(|r| r.starts_with("GET ") || r.starts_with("HEAD ")),
        "{:?}",
        web.requests()
    );
}
