//! bento's benchmark suite (`bench/run.sh`, docs/benchmarks.md): every scenario runs twice
//! on the same seeded data — bento, and the same job done the way a shell-script set-up
//! does it with stock tools (sftp, rsync, diff) — over a real sshd on loopback, with bytes
//! counted by a relay, and prints one table of both and their ratio.
//!
//! Needs root (accounts, chroots, sshd). Everything it creates is undone on exit, panic or
//! signal (see `cleanup`). Usage: `suite [--quick] [--reps N] [--write-doc] [SCENARIO…]`.

#![allow(clippy::print_stdout)]

mod cleanup;
mod data;
mod delivery;
mod fleet_poll;
mod machine;
mod objectstore;
mod prebuilt;
mod proc;
mod publish;
mod relay;
mod server;
mod status;
mod table;
mod wire;

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Instant, SystemTime};

use table::Row;

/// Runs a group of scenarios, adding its rows.
type Scenarios = fn(&Config, &mut Vec<Row>);

pub struct Config {
    pub quick: bool,
    /// `--smoke`: tiny sizes and one repetition, so the test command can run every scenario
    /// and the suite cannot rot (implies `quick`).
    pub smoke: bool,
    pub reps: usize,
    scenarios: BTreeSet<u8>,
    /// `--part=NAME`: only these parts of a scenario that has parts (all when empty).
    parts: BTreeSet<String>,
}

impl Config {
    pub fn wants(&self, n: u8) -> bool {
        self.scenarios.contains(&n)
    }

    /// Whether the part `name` of a scenario runs (`--part`; every part by default).
    pub fn runs(&self, name: &str) -> bool {
        self.parts.is_empty() || self.parts.contains(name)
    }
}

const NAMES: &[(u8, &str, &str)] = &[
    (
        1,
        "poll",
        "no-change poll vs sftp and the bare-connect floor",
    ),
    (
        2,
        "change",
        "one file changed in a 400-file / 5 MB configuration",
    ),
    (3, "connections", "TCP connections of one full update"),
    (
        4,
        "publish",
        "publish of a 1,000-host fleet (cold, no change, one common change), disk",
    ),
    (
        5,
        "status",
        "bento status --json over 10,000 hosts x 100 reports",
    ),
    (
        6,
        "fleet",
        "N agents polling one sshd with bounded concurrency",
    ),
    (
        7,
        "delivery",
        "server disk of build_on = \"server\" caches: 100 hosts sharing 90 % of their closure",
    ),
    (
        8,
        "prebuilt",
        "update where k of N paths changed: prebuilt through cache/ vs the host building",
    ),
    (
        9,
        "s3",
        "the object store (SeaweedFS) beside SFTP: poll bytes, polls/s, publish, disk",
    ),
];

fn usage() -> ! {
    eprintln!(
        "usage: suite [--quick|--smoke] [--reps N] [--part=PART] [--write-doc] [SCENARIO…]\n--part: only that part of a scenario (9: poll, publish, formats, disk); a partial run never writes the doc\nscenarios (default all):"
    );
    for (n, name, what) in NAMES {
        eprintln!("  {n} | {name:<12} {what}");
    }
    std::process::exit(2)
}

fn parse_args() -> (Config, bool) {
    let mut quick = false;
    let mut smoke = false;
    let mut reps = None;
    let mut write_doc = false;
    let mut scenarios = BTreeSet::new();
    let mut parts = BTreeSet::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {} // passed by `cargo bench`
            "--quick" => quick = true,
            "--smoke" => {
                smoke = true;
                quick = true;
            }
            "--write-doc" => write_doc = true,
            "--reps" => {
                reps = args
                    .next()
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|n| (1..=50).contains(n));
                if reps.is_none() {
                    usage();
                }
            }
            "-h" | "--help" => usage(),
            part if part.starts_with("--part=") => {
                parts.insert(part["--part=".len()..].to_owned());
            }
            other => match NAMES
                .iter()
                .find(|(n, name, _)| other == *name || other == n.to_string())
            {
                Some((n, _, _)) => {
                    scenarios.insert(*n);
                }
                None => {
                    eprintln!("unknown scenario or option: {other}");
                    usage()
                }
            },
        }
    }
    if scenarios.is_empty() {
        scenarios = NAMES.iter().map(|(n, _, _)| *n).collect();
    }
    // Only a whole run is the published table.
    let partial = !parts.is_empty();
    let reps = reps.unwrap_or(if smoke {
        1
    } else if quick {
        3
    } else {
        5
    });
    (
        Config {
            quick,
            smoke,
            reps,
            scenarios,
            parts,
        },
        write_doc && !partial,
    )
}

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let os = std::fs::read_to_string("/etc/debian_version")
        .map(|v| format!("Debian {}", v.trim()))
        .unwrap_or_else(|_| "Linux".into());
    let tool = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
                t.push_str(&String::from_utf8_lossy(&o.stderr));
                t.lines().next().unwrap_or_default().trim().to_owned()
            })
            .unwrap_or_default()
    };
    format!(
        "{os}, {cores} cores ({cpu}), {mem_gib:.0} GiB; {}; {}; {}",
        tool("ssh", "-V"),
        tool("nix", "--version"),
        tool("rsync", "--version")
            .split("  protocol")
            .next()
            .unwrap_or_default()
    )
}

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == proc::MEASURE) {
        proc::measure_main(&args[2..]);
    }
    cleanup::install_signal_thread();
    let (cfg, write_doc) = parse_args();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the benchmark suite needs root: it creates accounts, chroots and an sshd");
        std::process::exit(2);
    }
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let groups: [(&[u8], Scenarios); 7] = [
        (&[1, 2, 3], wire::run),
        (&[4], publish::run),
        (&[5], status::run),
        (&[6], fleet_poll::run),
        (&[7], delivery::run),
        (&[8], prebuilt::run),
        (&[9], objectstore::run),
    ];
    for (numbers, run) in groups {
        if !numbers.iter().any(|n| cfg.wants(*n)) {
            continue;
        }
        let t = Instant::now();
        eprintln!("== scenarios {numbers:?}");
        let mut group_rows = Vec::new();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| run(&cfg, &mut group_rows)));
        rows.extend(group_rows);
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            let first = msg.lines().next().unwrap_or_default().replace('|', "/");
            eprintln!("scenarios {numbers:?} failed: {msg}");
            rows.push(
                Row::new(
                    &format!("{numbers:?}"),
                    "scenario failed",
                    table::Unit::Count,
                )
                .note(format!("failed: {first}")),
            );
        }
        eprintln!("   took {:.0} s", t.elapsed().as_secs_f64());
    }
    cleanup::run_all();

    let table = table::markdown(&rows);
    println!("\n{table}");
    let elapsed = started.elapsed().as_secs_f64();
    println!("total: {elapsed:.0} s");
    if write_doc {
        let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let body = format!(
            "Measured {} on {} with `bench/run.sh{}` ({} repetitions unless n says otherwise; the whole run took {:.0} min).\n\n{table}",
            &date[..10],
            machine_description(),
            if cfg.quick { " --quick" } else { "" },
            cfg.reps,
            elapsed / 60.0,
        );
        let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md");
        match table::write_doc(&doc, &body) {
            Ok(()) => eprintln!("wrote the table into {}", doc.display()),
            Err(e) => {
                eprintln!("cannot write the table: {e}");
                std::process::exit(1);
            }
        }
    }
    if rows
        .iter()
        .any(|r| r.note.as_deref().is_some_and(|n| n.starts_with("failed")))
    {
        std::process::exit(1);
    }
}
