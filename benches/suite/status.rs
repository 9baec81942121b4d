//! Scenario 5: `bento status --json` over a generated chroot of many hosts, each with a live
//! manifest, a heartbeat, a latest report and many older reports (hard links to one file,
//! so the directory entries are real and the disk stays small). States are mixed with a
//! fixed seed. Time and peak memory (`wait4`), first with 10 old reports per host, then
//! with 100: memory must not grow with them. The baseline is the shell way: per host, read
//! `current`, list the reports, read the newest.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::data::Rng;
use crate::proc;
use crate::server::{bento, Scratch};
use crate::table::{Row, Samples, Unit};
use crate::Config;

const NOW: &str = "2026-11-25T12:00:00Z";

const BASELINE_SCRIPT: &str = r#"
set -u
for h in $(ls -d "$CHROOT"/*/ | head -n "$LIMIT"); do
  cur=$(cat "$h/current" 2>/dev/null)
  last=$(ls "$h/logs/reports" 2>/dev/null | tail -n 1)
  outcome=none
  [ -n "$last" ] && outcome=$(grep -o '"outcome": *"[a-z-]*"' "$h/logs/reports/$last")
  echo "$(basename "$h") ${cur:0:12} $outcome"
done
"#;

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn t(secs_before_now: u64) -> SystemTime {
    humantime::parse_rfc3339(NOW).unwrap() - Duration::from_secs(secs_before_now)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn report_id(t: SystemTime) -> String {
    // 2026-11-25T12:00:00Z -> 20261125T120000Z
    rfc3339(t).replace(['-', ':'], "") + "-0000abcd"
}

fn store_path(rng: &mut Rng, name: &str) -> String {
    const A: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let h: String = (0..32)
        .map(|_| A[rng.below(A.len() as u64) as usize] as char)
        .collect();
    format!("/nix/store/{h}-{name}")
}

/// One host directory; returns its reports directory and the report bytes.
fn write_host(root: &Path, n: usize, rng: &mut Rng) -> Option<(std::path::PathBuf, Vec<u8>)> {
    let host = format!("host{n:05}");
    let hd = root.join(&host);
    for sub in ["manifests", "objects", "logs/reports"] {
        fs::create_dir_all(hd.join(sub)).unwrap();
    }
    let (sys_old, sys_new) = (
        store_path(rng, &format!("nixos-system-{host}-1")),
        store_path(rng, &format!("nixos-system-{host}-2")),
    );
    let mut config = vec![json!({"path": "common", "kind": "directory"})];
    for i in 0..20 {
        config.push(
            json!({"path": format!("common/m{i:02}.nix"), "kind": "file", "size": 1024,
            "sha256": sha(format!("module {i}").as_bytes()), "executable": false}),
        );
    }
    config.push(
        json!({"path": "configuration.nix", "kind": "file", "size": 300,
        "sha256": sha(host.as_bytes()), "executable": false}),
    );
    let manifest = json!({"format": 1, "host": host, "created": rfc3339(t(7200)),
        "source_commit": null, "build": "classic", "system": sys_new,
        "config": config, "files": []});
    let mut mbytes = serde_json::to_vec(&manifest).unwrap();
    mbytes.push(b'\n');
    let digest = sha(&mbytes);
    fs::write(hd.join("manifests").join(format!("{digest}.json")), &mbytes).unwrap();
    fs::write(hd.join("current"), format!("{digest}\n")).unwrap();

    let roll = rng.unit();
    if roll < 0.01 {
        return None; // never seen
    }
    let older = sha(format!("{host} older").as_bytes());
    let (version, outcome, after, seen) = if roll < 0.90 {
        (&digest, "success", &sys_new, 300)
    } else if roll < 0.95 {
        (&older, "success", &sys_old, 300)
    } else if roll < 0.97 {
        (&digest, "failure", &sys_old, 300)
    } else if roll < 0.98 {
        (&digest, "rollback", &sys_old, 300)
    } else {
        (&digest, "success", &sys_new, 3 * 3600)
    };
    let id = report_id(t(seen));
    let report = json!({"format": 1, "id": id, "host": host, "version": version,
        "previous_version": older, "outcome": outcome, "system_before": sys_old,
        "system_after": after, "built_system": after,
        "started": rfc3339(t(seen + 60)), "finished": rfc3339(t(seen)),
        "timings": {"total_ms": 60000}, "agent_version": "0.1.0",
        "error": if outcome == "success" { None } else { Some("build failed: example") },
        "log_tail": (0..30).map(|i| format!("building line {i}")).collect::<Vec<_>>().join("\n"),
        "reboot_required": false});
    let mut rbytes = serde_json::to_vec_pretty(&report).unwrap();
    rbytes.push(b'\n');
    fs::write(hd.join("logs/latest.json"), &rbytes).unwrap();
    let hb = json!({"format": 1, "host": host, "time": rfc3339(t(seen)),
        "version": if outcome == "success" { version } else { &older },
        "system": after, "last_outcome": outcome, "last_report": id, "agent_version": "0.1.0"});
    let mut hbytes = serde_json::to_vec(&hb).unwrap();
    hbytes.push(b'\n');
    fs::write(hd.join("logs/heartbeat.json"), hbytes).unwrap();
    Some((hd.join("logs/reports"), rbytes))
}

/// Old reports `from..to` days back: one real file per host, the rest hard links to it.
fn add_reports(dir: &Path, bytes: &[u8], from: u64, to: u64) {
    let first = dir.join(format!("{}.json", report_id(t(86_400))));
    if !first.exists() {
        fs::write(&first, bytes).unwrap();
    }
    for d in from.max(2)..=to {
        let p = dir.join(format!("{}.json", report_id(t(d * 86_400))));
        fs::hard_link(&first, p).unwrap();
    }
}

pub fn run(cfg: &Config, rows: &mut Vec<Row>) {
    let hosts = if cfg.smoke {
        40
    } else if cfg.quick {
        500
    } else {
        10_000
    };
    let scratch = Scratch::new("status");
    let chroot = scratch.join("chroot");
    fs::create_dir_all(chroot.join(".bento")).unwrap();
    let fleet = scratch.join("fleet");
    fs::create_dir_all(&fleet).unwrap();
    fs::write(
        fleet.join("bento.toml"),
        format!("[server]\nchroot = \"{}\"\n", chroot.display()),
    )
    .unwrap();

    let mut rng = Rng::new(5);
    let written: Vec<_> = (0..hosts)
        .filter_map(|n| write_host(&chroot, n, &mut rng))
        .collect();
    let reports_per_stage = [10u64, 100];
    let s = format!("5. status, {hosts} hosts");
    let mut rss_at = Vec::new();
    let mut prev = 0;
    for (stage, &reports) in reports_per_stage.iter().enumerate() {
        std::thread::scope(|sc| {
            for chunk in written.chunks(written.len().div_ceil(2).max(1)) {
                sc.spawn(move || {
                    for (dir, bytes) in chunk {
                        add_reports(dir, bytes, prev + 1, reports);
                    }
                });
            }
        });
        prev = reports;
        // What status remembers of a host's files (`.bento/status-files`) takes a file only
        // once its last change is older than the racy window. Runs straight after writing
        // would each find more files settled and rewrite the memo, a cost of how recently
        // the fleet was generated, not of its old reports: both stages measure a fleet
        // whose files are all settled, the warm-up run remembering them.
        std::thread::sleep(bento::sys::stamp::RACY_WINDOW + Duration::from_millis(500));
        let (mut time, mut rss) = (Samples::default(), Samples::default());
        // One warm-up: the measurements are warm-cache.
        for i in 0..=cfg.reps {
            let r = proc::run(
                bento()
                    .args(["--fleet"])
                    .arg(&fleet)
                    .args(["status", "--json", "--color", "never", "--now", NOW]),
                b"",
                Duration::from_secs(300),
            );
            assert!(
                matches!(r.code(), 0 | 2) && r.stdout.len() > hosts,
                "bento status: {}",
                String::from_utf8_lossy(&r.stderr)
            );
            if i > 0 {
                time.push(r.elapsed.as_secs_f64());
                rss.push(r.maxrss_kib as f64);
            }
        }
        rss_at.push(rss.median());
        let last = stage == reports_per_stage.len() - 1;
        let mut trow = Row::new(
            &s,
            &format!("time, {reports} old reports per host"),
            Unit::Secs,
        )
        .bento(time.clone());
        if last {
            let mut b = Samples::default();
            let reps = if cfg.quick { cfg.reps } else { 1 };
            // ~20 ms per host here: a full run times the loop on 1,000 hosts and scales
            // (each host is one independent iteration).
            let limit = hosts.min(1000);
            let scale = hosts as f64 / limit as f64;
            for _ in 0..reps {
                let r = proc::run(
                    Command::new("bash")
                        .args(["-c", BASELINE_SCRIPT])
                        .env("CHROOT", &chroot)
                        .env("LIMIT", limit.to_string()),
                    b"",
                    Duration::from_secs(900),
                );
                assert!(r.status.success(), "baseline status: {}", r.text());
                b.push(r.elapsed.as_secs_f64() * scale);
            }
            trow = trow.baseline(b);
            if limit < hosts {
                trow.measure
                    .push_str(&format!(" (baseline timed on {limit} hosts, ×{scale:.0})"));
            }
        }
        // Issue #26: under 0.3 s at 10,000 hosts, however many old reports they keep.
        let m = time.median();
        trow = trow.goal(format!("under 0.3 s; {m:.2} s"), m < 0.3);
        rows.push(trow);
        let mut mrow = Row::new(
            &s,
            &format!("peak memory, {reports} old reports per host"),
            Unit::KiB,
        )
        .bento(rss);
        if last {
            let growth = rss_at[rss_at.len() - 1] / rss_at[0];
            mrow = mrow.goal(
                format!("independent of old reports; {growth:.2}× of the 10-report run"),
                growth <= 1.10,
            );
        }
        rows.push(mrow);
    }
}
