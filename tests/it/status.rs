//! `bento status` on fixture chroots: one host in every state (and the publish/report race),
//! the table and JSON as snapshots, the exit code, the Prometheus textfile, a hostile
//! `logs/`, and `--watch` redrawing when a report lands.

use std::collections::BTreeSet;
use std::fs;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bento::nix::StorePath;
use bento::protocol::layout::{self, Chroot};
use bento::protocol::manifest::{Build, ConfigEntry, Digest, Manifest, RelPath};
use bento::protocol::report::{Heartbeat, Outcome, Report, Timings};
use bento::protocol::HostName;
use bento::server::build::record::{self, BuildRecord};

use crate::common::{bento, bento_std, ScratchDir};

/// The time every fixture is relative to (passed as the hidden `--now`).
const NOW: &str = "2026-11-25T12:00:00Z";

fn at(offset_secs: i64) -> bento::protocol::Timestamp {
    let now = humantime::parse_rfc3339(NOW).unwrap();
    let t = if offset_secs < 0 {
        now - Duration::from_secs(offset_secs.unsigned_abs())
    } else {
        now + Duration::from_secs(offset_secs as u64)
    };
    bento::protocol::Timestamp::seconds(t)
}

fn system(host: &str, tag: char) -> String {
    format!(
        "/nix/store/{}-nixos-system-{host}-1",
        tag.to_string().repeat(32)
    )
}

struct Fixture {
    _scratch: ScratchDir,
    fleet: PathBuf,
    chroot: Chroot,
}

impl Fixture {
    fn new(hosts_toml: &str) -> Self {
        let scratch = ScratchDir::new();
        let fleet = scratch.join("fleet");
        let chroot = Chroot::new(scratch.join("chroot"));
        fs::create_dir_all(&fleet).unwrap();
        fs::create_dir_all(chroot.state_dir()).unwrap();
        fs::write(
            fleet.join("bento.toml"),
            format!(
                "[server]\nchroot = \"{}\"\n\n{hosts_toml}",
                chroot.root.display()
            ),
        )
        .unwrap();
        Self {
            _scratch: scratch,
            fleet,
            chroot,
        }
    }

    fn host_dir(&self, host: &str) -> PathBuf {
        self.chroot.host_dir(&HostName::new(host).unwrap())
    }

    /// Publishes a version of `host` (a manifest with one config file whose content is
    /// `content`), created `offset` seconds from NOW; returns its digest.
    fn publish(&self, host: &str, content: &str, offset: i64, system: Option<&str>) -> Digest {
        let mut m = manifest(host, content, system);
        m.created = at(offset);
        let bytes = m.to_bytes();
        let digest = Digest::of(&bytes);
        let dir = self.host_dir(host);
        fs::create_dir_all(dir.join("manifests")).unwrap();
        fs::create_dir_all(dir.join("logs")).unwrap();
        fs::write(layout::manifest(&dir, &digest), &bytes).unwrap();
        fs::write(layout::current(&dir), layout::current_text(&digest)).unwrap();
        digest
    }

    fn heartbeat(&self, host: &str, offset: i64, version: Option<Digest>, system: &str) {
        self.heartbeat_with(host, offset, version, system, |_| {});
    }

    fn heartbeat_with(
        &self,
        host: &str,
        offset: i64,
        version: Option<Digest>,
        system: &str,
        change: impl FnOnce(&mut Heartbeat),
    ) {
        let mut hb = Heartbeat {
            format: 1,
            host: HostName::new(host).unwrap(),
            time: at(offset),
            version,
            system: Some(system.to_owned()),
            last_outcome: None,
            last_report: None,
            agent_version: "0.1.0".into(),
            reboot_pending: false,
            auto_updated: false,
            last_success: None,
            verifies_signatures: None,
            serial: None,
            stale: None,
            clock_offset_s: None,
            formats: vec![],
        };
        change(&mut hb);
        write_atomic(
            &self.host_dir(host).join("logs/heartbeat.json"),
            &hb.to_bytes(),
            hb.time.system_time(),
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        host: &str,
        offset: i64,
        version: Digest,
        outcome: Outcome,
        before: &str,
        after: &str,
        error: Option<&str>,
    ) {
        let r = Report {
            format: 1,
            id: format!("20261125T115000Z-{:08x}", offset.unsigned_abs()),
            host: HostName::new(host).unwrap(),
            kind: bento::protocol::report::RunKind::Published,
            version,
            previous_version: Some(Digest::of(b"older")),
            outcome,
            system_before: Some(before.to_owned()),
            system_after: Some(after.to_owned()),
            built_system: Some(after.to_owned()),
            started: at(offset - 30),
            finished: at(offset),
            timings: Timings::default(),
            agent_version: "0.1.0".into(),
            error: error.map(str::to_owned),
            log_tail: String::new(),
            reboot_required: false,
            checks: Vec::new(),
            clock_warning: None,
            clock_offset_s: None,
        };
        write_atomic(
            &self.host_dir(host).join("logs/latest.json"),
            &r.to_bytes(),
            r.finished.system_time(),
        );
    }

    fn status(&self) -> assert_cmd::Command {
        let mut cmd = bento();
        cmd.arg("--fleet")
            .arg(&self.fleet)
            .args(["status", "--now", NOW, "--color", "never"]);
        cmd
    }
}

/// As the agent's SFTP upload does: a temporary name, then a rename; received at
/// `received` by the server's clock (status judges liveness by it).
fn write_atomic(path: &Path, bytes: &[u8], received: std::time::SystemTime) {
    let tmp = path.with_file_name(".tmp-upload");
    fs::write(&tmp, bytes).unwrap();
    fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(received)
        .unwrap();
    fs::rename(&tmp, path).unwrap();
}

fn manifest(host: &str, content: &str, system: Option<&str>) -> Manifest {
    Manifest {
        format: 1,
        host: HostName::new(host).unwrap(),
        created: NOW.parse().unwrap(),
        serial: 0,
        source_commit: None,
        dirty: false,
        build: Build::Flake,
        system: system.map(|s| StorePath::new(s).unwrap()),
        config: vec![ConfigEntry::File {
            path: RelPath::new("flake.nix").unwrap(),
            size: content.len() as u64,
            sha256: Digest::of(content.as_bytes()),
            executable: false,
        }],
        tree: None,
        files: vec![],
    }
}

const HOSTS: &str = "[hosts.current]\n[hosts.racing]\n[hosts.broken]\n[hosts.rolledback]\n\
[hosts.handmade]\n[hosts.fresh]\n[hosts.gone]\n[hosts.slow]\ninterval = \"6h\"\n\
[hosts.built]\n[hosts.stalebuild]\n[hosts.hostile]\n[hosts.unpublished]\n";

/// A fleet with one host in each state.
fn every_state() -> Fixture {
    let f = Fixture::new(HOSTS);
    // up to date: runs the live version's expected system.
    let (s1, s2) = (system("current", 'a'), system("current", 'b'));
    let v = f.publish("current", "current 2", -3600, Some(&s2));
    f.report("current", -3000, v, Outcome::Success, &s1, &s2, None);
    // It applied a new kernel and waits for its reboot; its agent checks signatures.
    f.heartbeat_with("current", -60, Some(v), &s2, |hb| {
        hb.reboot_pending = true;
        hb.verifies_signatures = Some(true);
    });

    // The race: N+1 went live 10 s ago; the host's report and heartbeat for N landed after.
    let (r1, r2) = (system("racing", 'a'), system("racing", 'b'));
    let n = Digest::of(b"racing version N");
    f.publish("racing", "racing N+1", -10, Some(&r2));
    f.report("racing", -5, n, Outcome::Success, &r1, &r1, None);
    f.heartbeat("racing", -4, Some(n), &r1);

    // failing: its attempt at the live version failed.
    let (b1, b2) = (system("broken", 'a'), system("broken", 'b'));
    let v = f.publish("broken", "broken 2", -3600, Some(&b2));
    f.report(
        "broken",
        -600,
        v,
        Outcome::Failure,
        &b1,
        &b1,
        Some("build failed: attribute 'services.nginx.foo' does not exist\nmore detail"),
    );
    f.heartbeat("broken", -590, Some(Digest::of(b"older")), &b1);

    // rolled back.
    let (o1, o2) = (system("rolledback", 'a'), system("rolledback", 'b'));
    let v = f.publish("rolledback", "rolledback 2", -3600, Some(&o2));
    f.report(
        "rolledback",
        -300,
        v,
        Outcome::Rollback,
        &o1,
        &o1,
        Some("server unreachable after activation; rolled back"),
    );
    f.heartbeat("rolledback", -290, Some(Digest::of(b"older")), &o1);

    // drifted: runs the live version, but a system rebuilt by hand.
    let (h1, h2) = (system("handmade", 'a'), system("handmade", 'b'));
    let v = f.publish("handmade", "handmade 2", -3600, Some(&h2));
    f.report("handmade", -3000, v, Outcome::Success, &h1, &h2, None);
    f.heartbeat("handmade", -120, Some(v), &system("handmade", 'x'));

    // new: published, never heard from.
    f.publish("fresh", "fresh 1", -3600, None);

    // silent: last heartbeat two hours ago, polls every 15 minutes.
    let g = system("gone", 'a');
    let v = f.publish("gone", "gone 1", -86_400, Some(&g));
    f.report("gone", -80_000, v, Outcome::Success, &g, &g, None);
    f.heartbeat("gone", -7200, Some(v), &g);

    // Polls every 6 hours: two hours of quiet is fine.
    let s = system("slow", 'a');
    let v = f.publish("slow", "slow 1", -86_400, Some(&s));
    f.report("slow", -80_000, v, Outcome::Success, &s, &s, None);
    // Its agent has no trusted_keys: it applies whatever the chroot holds, unsigned.
    f.heartbeat_with("slow", -7200, Some(v), &s, |hb| {
        hb.verifies_signatures = Some(false)
    });

    // Expected system from `bento build` (manifest without one), matching the live config.
    let bs = system("built", 'c');
    let v = f.publish("built", "built 1", -3600, None);
    let m = manifest("built", "built 1", None);
    record::write(
        &f.chroot,
        &BuildRecord {
            format: record::RECORD_FORMAT,
            host: HostName::new("built").unwrap(),
            key: record::content_key(m.build, &m.config),
            system: Some(StorePath::new(&bs).unwrap()),
            drv: None,
            built: true,
            time: at(-4000).to_string(),
        },
    )
    .unwrap();
    f.report(
        "built",
        -3000,
        v,
        Outcome::Success,
        &system("built", 'a'),
        &bs,
        None,
    );
    f.heartbeat("built", -30, Some(v), &bs);

    // A build of an older configuration is not the expected system of the live version.
    let v = f.publish("stalebuild", "stalebuild 2", -3600, None);
    let old = manifest("stalebuild", "stalebuild 1", None);
    record::write(
        &f.chroot,
        &BuildRecord {
            format: record::RECORD_FORMAT,
            host: HostName::new("stalebuild").unwrap(),
            key: record::content_key(old.build, &old.config),
            system: Some(StorePath::new(&system("stalebuild", 'z')).unwrap()),
            drv: None,
            built: true,
            time: at(-7200).to_string(),
        },
    )
    .unwrap();
    let sb = system("stalebuild", 'd');
    f.report("stalebuild", -3000, v, Outcome::Success, &sb, &sb, None);
    f.heartbeat("stalebuild", -30, Some(v), &sb);

    // A host that planted a symlink to another host's files: never followed.
    f.publish("hostile", "hostile 1", -3600, None);
    let other = f.host_dir("current").join("logs/heartbeat.json");
    std::os::unix::fs::symlink(other, f.host_dir("hostile").join("logs/heartbeat.json")).unwrap();
    f
}

fn settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_snapshot_path("snapshots");
    s.set_prepend_module_to_snapshot(false);
    // The scratch directory is random; digests and times are fixed by the fixture.
    s.add_filter(r"/var/lib/bento-it/t-[A-Za-z0-9]+", "[SCRATCH]");
    s
}

#[test]
fn table_shows_every_state_problems_first_and_exits_2() {
    let f = every_state();
    let out = f.status().assert().code(2).get_output().clone();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(!table.contains('\x1b'), "no colour when piped:\n{table}");
    settings().bind(|| insta::assert_snapshot!("status_table", table));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("12 hosts: 1 unknown, 1 failing, 1 rolled back, 1 silent, 1 drifted, 1 update pending, 2 new, 4 up to date"),
        "{stderr}"
    );
}

#[test]
fn json_has_stable_fields_and_state_names() {
    let f = every_state();
    let out = f
        .status()
        .arg("--json")
        .assert()
        .code(2)
        .get_output()
        .clone();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let state = |host: &str| {
        rows.iter()
            .find(|r| r["host"] == host)
            .unwrap_or_else(|| panic!("{host}"))["state"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(state("current"), "up-to-date");
    assert_eq!(
        state("racing"),
        "update-pending",
        "the race must never look up to date"
    );
    assert_eq!(state("broken"), "failing");
    assert_eq!(state("rolledback"), "rolled-back");
    assert_eq!(state("handmade"), "drifted");
    assert_eq!(state("fresh"), "new");
    assert_eq!(state("gone"), "silent");
    assert_eq!(state("slow"), "up-to-date");
    assert_eq!(state("built"), "up-to-date");
    let field =
        |host: &str, name: &str| rows.iter().find(|r| r["host"] == host).unwrap()[name].clone();
    assert_eq!(field("current", "reboot_pending"), true);
    assert_eq!(field("racing", "reboot_pending"), false);
    assert_eq!(field("current", "verifies_signatures"), true);
    assert_eq!(field("slow", "verifies_signatures"), false);
    // An agent that does not say (older than the field) is unknown, not unverified.
    assert_eq!(
        field("gone", "verifies_signatures"),
        serde_json::Value::Null
    );
    for r in rows {
        for field in [
            "host",
            "state",
            "published",
            "expected_system",
            "running_system",
            "last_seen",
            "error",
            "reboot_pending",
            "verifies_signatures",
            "unreadable",
        ] {
            assert!(r.get(field).is_some(), "{field} missing in {r}");
        }
    }
    settings().bind(|| insta::assert_json_snapshot!("status_json", rows));
}

#[test]
fn healthy_hosts_exit_zero_and_host_filter() {
    let f = every_state();
    let out = f
        .status()
        .args(["--host", "current", "--host", "racing", "--host", "fresh"])
        .assert()
        .success()
        .get_output()
        .clone();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 4, "{text}");
    f.status()
        .args(["--host", "nosuchhost"])
        .assert()
        .code(1)
        .stderr(predicates::str::contains("no host named nosuchhost"));
}

#[test]
fn colour_only_when_asked_or_on_a_terminal() {
    let f = every_state();
    let out = bento()
        .arg("--fleet")
        .arg(&f.fleet)
        .args(["status", "--now", NOW, "--color", "always"])
        .assert()
        .code(2)
        .get_output()
        .clone();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\x1b[1;31mfailing\x1b[0m"), "{text}");
}

/// A strict reader of the node-exporter textfile format: HELP/TYPE before samples, valid
/// names and labels, numeric values, no duplicate series.
/// A sample: metric name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

fn parse_textfile(text: &str) -> Vec<Sample> {
    assert!(text.ends_with('\n'), "ends with a newline");
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut typed = BTreeSet::new();
    let mut series = BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name_ok(name), "{line}");
            if kind == "TYPE" {
                let t = parts.next().unwrap();
                assert!(["gauge", "counter", "untyped"].contains(&t), "{line}");
                assert!(typed.insert(name.to_owned()), "TYPE twice: {line}");
            } else {
                assert_eq!(kind, "HELP", "{line}");
            }
            continue;
        }
        let (series_text, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        let (name, labels) = match series_text.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').expect("closing brace")),
            None => (series_text, ""),
        };
        assert!(name_ok(name), "{line}");
        assert!(typed.contains(name), "sample before its TYPE: {line}");
        let mut parsed = Vec::new();
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap();
            assert!(name_ok(k), "{line}");
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .expect("quoted");
            parsed.push((k.to_owned(), v.to_owned()));
        }
        assert!(
            series.insert(series_text.to_owned()),
            "duplicate series {line}"
        );
        samples.push((name.to_owned(), parsed, value));
    }
    samples
}

#[test]
fn prometheus_textfile_parses_and_has_every_host() {
    let f = every_state();
    let prom = f.chroot.root.with_file_name("bento.prom");
    f.status().arg("--prometheus").arg(&prom).assert().code(2);
    let text = fs::read_to_string(&prom).unwrap();
    let samples = parse_textfile(&text);
    let value = |name: &str, labels: &[(&str, &str)]| {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels.len() == l.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| s.2)
    };
    assert_eq!(
        value(
            "bento_host_state",
            &[("host", "broken"), ("state", "failing")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            "bento_host_state",
            &[("host", "broken"), ("state", "up-to-date")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value("bento_host_state", &[("host", "gone"), ("state", "silent")]),
        Some(1.0)
    );
    assert_eq!(value("bento_hosts", &[("state", "up-to-date")]), Some(4.0));
    let seen = at(-60).system_time();
    let secs = seen
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert_eq!(
        value(
            "bento_host_last_seen_timestamp_seconds",
            &[("host", "current")]
        ),
        Some(secs)
    );
    let ok = at(-3000).system_time();
    let secs = ok.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as f64;
    assert_eq!(
        value(
            "bento_host_last_success_timestamp_seconds",
            &[("host", "current")]
        ),
        Some(secs)
    );
    assert_eq!(
        value("bento_host_reboot_pending", &[("host", "current")]),
        Some(1.0)
    );
    assert_eq!(
        value("bento_host_reboot_pending", &[("host", "racing")]),
        Some(0.0)
    );
    assert_eq!(
        value("bento_host_verifies_signatures", &[("host", "slow")]),
        Some(0.0)
    );
    assert_eq!(
        value("bento_host_verifies_signatures", &[("host", "current")]),
        Some(1.0)
    );
    assert_eq!(
        value("bento_host_verifies_signatures", &[("host", "gone")]),
        None,
        "an agent that does not say is not counted as unverified"
    );
    assert_eq!(
        value("bento_host_unreadable", &[("host", "current")]),
        Some(0.0)
    );
    // Every host has one sample per state, exactly one of them 1.
    for host in ["current", "racing", "fresh", "hostile", "unpublished"] {
        let states: Vec<f64> = samples
            .iter()
            .filter(|(n, l, _)| n == "bento_host_state" && l[0].1 == host)
            .map(|s| s.2)
            .collect();
        assert_eq!(states.len(), 10, "{host}");
        assert_eq!(states.iter().sum::<f64>(), 1.0, "{host}");
    }
    // Written atomically: no temporary file left beside it.
    let dir: Vec<String> = fs::read_dir(prom.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!dir.iter().any(|n| n.starts_with(".tmp-")), "{dir:?}");
}

/// Reads lines from a child's stdout until `want` accepts one or the deadline passes.
fn wait_for_line(
    rx: &std::sync::mpsc::Receiver<String>,
    deadline: Instant,
    want: impl Fn(&str) -> bool,
) -> Option<String> {
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if want(&line) => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

fn state_in(line: &str, host: &str) -> Option<String> {
    let rows: serde_json::Value = serde_json::from_str(line).ok()?;
    rows.as_array()?
        .iter()
        .find(|r| r["host"] == host)
        .map(|r| r["state"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn watch_redraws_when_a_report_lands_and_when_a_version_is_published() {
    let f = every_state();
    let mut child = bento_std()
        .arg("--fleet")
        .arg(&f.fleet)
        .args(["status", "--watch", "--json", "--now", NOW])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = wait_for_line(&rx, deadline, |l| l.starts_with('['));
    let result = (|| {
        let first = first.ok_or("no first table")?;
        if state_in(&first, "racing").as_deref() != Some("update-pending") {
            return Err("racing should start pending");
        }
        // The racing host applies N+1 and reports it.
        let dir = f.host_dir("racing");
        let live =
            layout::parse_current(&fs::read_to_string(layout::current(&dir)).unwrap()).unwrap();
        let (r1, r2) = (system("racing", 'a'), system("racing", 'b'));
        f.report("racing", -2, live, Outcome::Success, &r1, &r2, None);
        f.heartbeat("racing", -1, Some(live), &r2);
        wait_for_line(&rx, deadline, |l| {
            state_in(l, "racing").as_deref() == Some("up-to-date")
        })
        .ok_or("no redraw after the report")?;
        // A new version of `current` is published: it becomes pending.
        f.publish("current", "current 3", -1, Some(&system("current", 'e')));
        wait_for_line(&rx, deadline, |l| {
            state_in(l, "current").as_deref() == Some("update-pending")
        })
        .ok_or("no redraw after the publish")?;
        Ok(())
    })();
    child.kill().unwrap();
    child.wait().unwrap();
    result.unwrap();
}

/// True for a character a host must never get onto the operator's terminal raw (the same
/// set `bento::sys::terminal` escapes, so the test does not trust the code it tests).
fn is_hostile_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// A fleet where one host is failing and three hosts try to redraw the screen: a heartbeat
/// `system` that is a cursor-moving escape sequence, a heartbeat with an unknown field whose
/// (huge) name carries escapes, and a report whose error holds C1 and bidi controls.
fn forged_screen() -> Fixture {
    let f = Fixture::new("[hosts.broken]\n[hosts.evil1]\n[hosts.evil2]\n[hosts.evil3]\n");
    let (b1, b2) = (system("broken", 'a'), system("broken", 'b'));
    let v = f.publish("broken", "broken 2", -3600, Some(&b2));
    f.report(
        "broken",
        -600,
        v,
        Outcome::Failure,
        &b1,
        &b1,
        Some("build failed"),
    );
    f.heartbeat("broken", -590, Some(Digest::of(b"older")), &b1);

    // Up a line, wipe it, and print a fake healthy row for `broken` over the real one.
    let forged = "\x1b[1A\r\x1b[2Kbroken  up to date  b3901de783d6 60m ago  bbbbbbbb  bbbbbbbb  9m ago\x1b[0m";
    let e = system("evil1", 'e');
    let v = f.publish("evil1", "evil1 1", -3600, Some(&e));
    f.report("evil1", -600, v, Outcome::Success, &e, &e, None);
    f.heartbeat("evil1", -60, Some(v), forged);

    let v = f.publish("evil2", "evil2 1", -3600, None);
    let field = format!("\x1b]0;owned\x07\x1b[2J{}", "A".repeat(100_000));
    let hb = serde_json::json!({
        "format": 1, "host": "evil2", "time": at(-60), "version": v.to_hex(),
        "system": system("evil2", 'e'), "last_outcome": null, "last_report": null,
        "agent_version": "0.1.0", field: 1,
    });
    write_atomic(
        &f.host_dir("evil2").join("logs/heartbeat.json"),
        hb.to_string().as_bytes(),
        at(-60).system_time(),
    );

    let e = system("evil3", 'e');
    let v = f.publish("evil3", "evil3 1", -3600, Some(&e));
    f.report(
        "evil3",
        -600,
        v,
        Outcome::Failure,
        &e,
        &e,
        Some("gniliaf\u{202e} \u{9b}2J\u{2066}x"),
    );
    f.heartbeat("evil3", -590, None, &e);
    f
}

#[test]
fn a_hostile_host_cannot_forge_the_status_screen() {
    let f = forged_screen();
    let out = f.status().assert().code(2).get_output().clone();
    let table = String::from_utf8(out.stdout).unwrap();
    let raw: Vec<char> = table
        .chars()
        .filter(|&c| c != '\n' && is_hostile_char(c))
        .collect();
    assert!(
        raw.is_empty(),
        "raw controls {raw:?} reached the table:\n{table}"
    );
    let row = |host: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{host} ")))
            .unwrap_or_else(|| panic!("no row for {host}:\n{table}"))
            .to_owned()
    };
    assert!(row("broken").contains("failing"), "{table}");
    // The heartbeat's `system` is not a store path: a note, not a running system.
    let evil1 = row("evil1");
    assert!(evil1.contains("system is not a store path"), "{evil1}");
    assert!(evil1.contains("\\u{1b}[1A"), "shown escaped: {evil1}");
    // The unknown field's name is quoted escaped, and cut short.
    let evil2 = row("evil2");
    assert!(evil2.contains("unknown field"), "{evil2}");
    assert!(evil2.contains("\\u{1b}]0;owned\\u{7}"), "{evil2}");
    assert!(
        evil2.chars().count() < 400,
        "{} chars",
        evil2.chars().count()
    );
    let evil3 = row("evil3");
    // The report's error: C0/C1 controls dropped (one line), bidi controls shown escaped.
    assert!(evil3.contains("gniliaf\\u{202e} 2J\\u{2066}x"), "{evil3}");

    // JSON keeps the values out too, and is bounded.
    let out = f
        .status()
        .arg("--json")
        .assert()
        .code(2)
        .get_output()
        .clone();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let json_row = |host: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["host"] == host)
            .unwrap()
            .clone()
    };
    assert_eq!(json_row("broken")["state"], "failing");
    // Not the forged text: the heartbeat's value is dropped, the report's store path stays.
    assert_eq!(json_row("evil1")["running_system"], system("evil1", 'e'));
    assert!(json_row("evil2")["error"].as_str().unwrap().chars().count() < 300);
}

#[test]
fn watch_escapes_what_hosts_wrote() {
    let f = forged_screen();
    let mut child = bento_std()
        .arg("--fleet")
        .arg(&f.fleet)
        .args(["status", "--watch", "--color", "always", "--now", NOW])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines: Vec<String> = Vec::new();
    let hosts = ["broken ", "evil1 ", "evil2 ", "evil3 "];
    let plain = |l: &String| l.replace("\x1b[H\x1b[2J", "");
    while !hosts
        .iter()
        .all(|h| lines.iter().any(|l| plain(l).starts_with(h)))
    {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        lines
            .iter()
            .filter(|l| hosts.iter().any(|h| plain(l).starts_with(h)))
            .count(),
        4,
        "no whole table: {lines:?}"
    );
    // bento's own sequences: clear the screen, colour the state column.
    let ours = [
        "\x1b[H\x1b[2J",
        "\x1b[1;31m",
        "\x1b[33m",
        "\x1b[36m",
        "\x1b[32m",
        "\x1b[0m",
    ];
    for line in &lines {
        let mut rest = line.clone();
        for seq in ours {
            rest = rest.replace(seq, "");
        }
        let raw: Vec<char> = rest.chars().filter(|&c| is_hostile_char(c)).collect();
        assert!(raw.is_empty(), "raw controls {raw:?} in {line:?}");
    }
}

/// Hosts `a` and `b` published and heard from, `c` only in bento.toml; host directories and
/// `.bento/` with the modes a real server gives them (root-only but for the host's group).
fn jailed() -> Fixture {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new("[hosts.a]\n[hosts.b]\n[hosts.c]\n");
    for host in ["a", "b"] {
        let s = system(host, 'a');
        let v = f.publish(host, &format!("{host} 1"), -3600, Some(&s));
        f.report(host, -600, v, Outcome::Success, &s, &s, None);
        f.heartbeat(host, -60, Some(v), &s);
        fs::set_permissions(f.host_dir(host), fs::Permissions::from_mode(0o750)).unwrap();
    }
    fs::set_permissions(f.chroot.state_dir(), fs::Permissions::from_mode(0o700)).unwrap();
    f
}

/// `bento --fleet … status …` as nobody (uid and gid 65534, no groups), as scripts/test.sh
/// runs the unit tier.
fn status_as_nobody(f: &Fixture, extra: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(assert_cmd::cargo::cargo_bin("bento"))
        .arg("--fleet")
        .arg(&f.fleet)
        .args(["status", "--now", NOW, "--color", "never"])
        .args(extra)
        .env("BENTO_LOG", "bento=info")
        .env_remove("BENTO_FLEET")
        .output()
        .expect("setpriv")
}

#[test]
fn status_that_cannot_read_the_chroot_exits_1_and_says_each_error_once() {
    let f = jailed();
    // As root every host reads fine.
    f.status().assert().success();

    let out = status_as_nobody(&f, &[]);
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let all = format!("{stdout}{stderr}");
    for host in ["a", "b"] {
        let dir = f.host_dir(host);
        for file in [layout::current(&dir), dir.join("logs")] {
            let error = format!("{}: Permission denied", file.display());
            assert_eq!(all.matches(&error).count(), 1, "{error}:\n{all}");
        }
    }
    assert_eq!(
        stderr
            .matches("error: could not read the files of 2 hosts (a and 1 more)")
            .count(),
        1,
        "{stderr}"
    );
    // The rollout's state (root-only) cannot be read either: one warning, not one per use.
    assert_eq!(stderr.matches("rollout.json").count(), 1, "{stderr}");

    let out = status_as_nobody(&f, &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let unreadable: Vec<(String, bool)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["host"].as_str().unwrap().to_owned(),
                r["unreadable"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        unreadable,
        [("a".into(), true), ("b".into(), true), ("c".into(), false)]
    );
    // What could not be read is `unknown`, not `new` (the state a partial read would give).
    let states: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states[..2], ["unknown", "unknown"], "{rows}");

    // A host it can read that is failing still makes it exit 2, and the others are still
    // said to be unknown.
    let (c1, c2) = (system("c", 'a'), system("c", 'b'));
    let v = f.publish("c", "c 2", -3600, Some(&c2));
    f.report(
        "c",
        -600,
        v,
        Outcome::Failure,
        &c1,
        &c1,
        Some("build failed"),
    );
    let out = status_as_nobody(&f, &[]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error: could not read the files of 2 hosts"),
        "{stderr}"
    );
}

#[test]
fn hosts_pruned_from_bento_toml_leave_status() {
    let f = Fixture::new("[hosts.kept]\n");
    for host in ["kept", "retired", "leftover"] {
        let s = system(host, 'a');
        let v = f.publish(host, &format!("{host} 1"), -3600, Some(&s));
        f.report(host, -600, v, Outcome::Success, &s, &s, None);
        f.heartbeat(host, -60, Some(v), &s);
    }
    // `retired` went through `bento server sync-accounts --prune`, which keeps its data
    // root-only; `leftover` was removed from bento.toml without it, so it can still log in.
    bento::server::chroot::seal_host_dir(&f.host_dir("retired")).unwrap();
    let out = f
        .status()
        .arg("--json")
        .assert()
        .success()
        .get_output()
        .clone();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hosts: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["kept", "leftover"], "{rows}");
    let leftover = &rows[1];
    assert!(
        leftover["error"]
            .as_str()
            .unwrap()
            .contains("not in bento.toml (`bento server sync-accounts --prune` retires it)"),
        "{leftover}"
    );
    assert_eq!(rows[0]["error"], serde_json::Value::Null);

    // Asked for by name, a retired host is still shown, as such.
    let out = f
        .status()
        .args(["--host", "retired"])
        .assert()
        .success()
        .get_output()
        .clone();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("not in bento.toml: retired (its directory is root-only)"),
        "{text}"
    );
    // Selectors do not pick it up either.
    let out = f
        .status()
        .args(["--on", "*", "--json"])
        .assert()
        .success()
        .get_output()
        .clone();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2, "{rows}");
}

#[test]
fn agent_status_shows_a_failed_connection_a_pending_reboot_and_unchecked_signatures() {
    use bento::agent::state::{Applied, LastRun, State, StateDir, Unreachable};
    let scratch = ScratchDir::new();
    let config = scratch.join("agent.toml");
    fs::write(
        &config,
        format!(
            "host = \"alpha\"\nserver = \"file://{0}/chroot\"\nstate_dir = \"{0}/state\"\n\
             current_system = \"{0}/no-current-system\"\nprofile = \"{0}/no-profile\"\n",
            scratch.path.display()
        ),
    )
    .unwrap();
    let t0 = at(-3600).system_time();
    let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let version = Digest::of(b"applied");
    let dirs = StateDir::new(&scratch.join("state"));
    dirs.create().unwrap();
    dirs.save(&State {
        applied: Some(Applied {
            version,
            system: StorePath::new(&system("alpha", 'a')).unwrap(),
            at: secs(t0),
            created: None,
            serial: None,
        }),
        last: Some(LastRun {
            id: "20261125T110000Z-00000000".into(),
            version,
            outcome: Outcome::Success,
            finished: secs(t0),
            error: None,
        }),
        reboot_pending: true,
        unreachable: Some(Unreachable {
            since: secs(t0) + 900,
            at: secs(t0) + 2700,
            runs: 3,
            error: "cannot connect to sftp://bento-alpha@bento.example.org: ssh: connect to host bento.example.org port 22: Connection refused".into(),
        }),
        ..Default::default()
    })
    .unwrap();
    let run = |json: bool| {
        let mut cmd = bento();
        cmd.args(["agent", "status", "--config"]).arg(&config);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.assert().success().get_output().clone();
        String::from_utf8(out.stdout).unwrap()
    };
    let mut settings = settings();
    // Whether systemd runs a timer depends on the machine running the test.
    settings.add_filter(r"(?m)^next run .*$", "next run  [TIMER]");
    settings.bind(|| insta::assert_snapshot!("agent_status", run(false)));

    let v: serde_json::Value = serde_json::from_str(&run(true)).unwrap();
    assert_eq!(v["reboot_pending"], true);
    assert_eq!(v["verifies_signatures"], false);
    assert_eq!(v["unreachable"]["runs"], 3);
    assert_eq!(v["unreachable"]["since"], "2026-11-25T11:15:00Z");
    assert_eq!(v["unreachable"]["at"], "2026-11-25T11:45:00Z");
    assert!(v["unreachable"]["error"]
        .as_str()
        .unwrap()
        .contains("Connection refused"));
    assert_eq!(v["last_outcome"], "success");
}

/// Issue #24 item 11: a drifted host has its own exit status (3), below an unhealthy one.
#[test]
fn a_drifted_host_exits_3_and_an_unhealthy_one_still_2() {
    let f = every_state();
    f.status().args(["--host", "handmade"]).assert().code(3);
    f.status()
        .args(["--host", "handmade", "--host", "current", "--json"])
        .assert()
        .code(3);
    f.status()
        .args(["--host", "handmade", "--host", "broken"])
        .assert()
        .code(2);
    f.status().args(["--host", "current"]).assert().success();
}

/// `.bento/status-heads` (what status remembers of each live manifest) follows `current`
/// to every new version and back, and a broken file is only a cache lost.
#[test]
fn remembered_heads_follow_current_to_each_new_version_and_back() {
    let f = Fixture::new("[hosts.web]\n");
    let row = || {
        let out = f.status().arg("--json").output().unwrap();
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let r = &rows.as_array().unwrap()[0];
        (
            r["published"].as_str().unwrap().to_owned(),
            r["expected_system"].as_str().unwrap().to_owned(),
            r["published_at"].as_str().unwrap().to_owned(),
        )
    };
    let heads = f.chroot.state_dir().join("status-heads");
    let (s1, s2) = (system("web", 'a'), system("web", 'b'));
    let v1 = f.publish("web", "one", -3600, Some(&s1));
    let first = row();
    assert_eq!((first.0.as_str(), first.1.as_str()), (&*v1.to_hex(), &*s1));
    assert!(heads.is_file(), "the first run keeps what it read");
    assert_eq!(row(), first, "and the next one finds the same from it");

    let v2 = f.publish("web", "two", -60, Some(&s2));
    let second = row();
    assert_eq!(
        (second.0.as_str(), second.1.as_str()),
        (&*v2.to_hex(), &*s2)
    );
    assert_ne!(second.2, first.2, "the new version's own time");

    // Back to the first version, as `bento rollback` does.
    let dir = f.host_dir("web");
    fs::write(layout::current(&dir), layout::current_text(&v1)).unwrap();
    assert_eq!(row(), first);

    fs::write(&heads, b"bento status heads 1\ntorn").unwrap();
    assert_eq!(row(), first, "a broken cache is read past");
}

/// `.bento/status-files` (what status read of each host's `current` and newest report,
/// under each file's stamp): a run finds unchanged files there and writes nothing, and a
/// report rewritten in place, the same size, its modification time put back, is read again.
#[test]
fn remembered_host_files_are_read_again_when_rewritten_even_in_place() {
    let f = Fixture::new("[hosts.web]\n");
    let s1 = system("web", 'a');
    let v1 = f.publish("web", "one", -3600, Some(&s1));
    f.heartbeat("web", -60, Some(v1), &s1);
    f.report("web", -120, v1, Outcome::Success, &s1, &s1, None);
    // Files changed in the last two seconds are not remembered (racy timestamps).
    std::thread::sleep(Duration::from_millis(2200));
    let row = || {
        let out = f.status().arg("--json").output().unwrap();
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        rows[0].clone()
    };
    let memo = f.chroot.state_dir().join("status-files");
    let first = row();
    assert_eq!(first["running_system"], s1.as_str());
    assert!(memo.is_file(), "the first run keeps what it read");
    let untouched = std::time::SystemTime::UNIX_EPOCH;
    let set_mtime = |path: &Path, t| {
        let file = fs::File::options().write(true).open(path).unwrap();
        file.set_modified(t).unwrap();
    };
    set_mtime(&memo, untouched);
    assert_eq!(row(), first, "the next run finds the same from it");
    let mtime = fs::metadata(&memo).unwrap().modified().unwrap();
    assert_eq!(mtime, untouched, "nothing read again, nothing written");

    let latest = f.host_dir("web").join("logs/latest.json");
    assert_eq!(first["last_success"], "2026-11-25T11:58:00Z");
    let received = fs::metadata(&latest).unwrap().modified().unwrap();
    let text = fs::read_to_string(&latest).unwrap();
    fs::write(&latest, text.replace("\"success\"", "\"failure\"")).unwrap();
    set_mtime(&latest, received);
    assert_eq!(row()["last_success"], serde_json::Value::Null);

    fs::write(&memo, b"bento status files 1\ntorn").unwrap();
    assert_eq!(
        row()["last_success"],
        serde_json::Value::Null,
        "a broken memo is read past"
    );
}
