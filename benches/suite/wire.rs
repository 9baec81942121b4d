//! Scenarios 1–3, one managed machine over the real sshd, every byte counted by the relay:
//!
//! 1. no-change poll: `bento agent update` with nothing new, against a fresh `sftp` session
//!    listing a timestamp file, and the floor (a bare ssh+sftp connect and quit);
//! 2. one file changed in a 400-file / 5 MB configuration: the agent's download, against
//!    `sftp get -R` of the whole configuration directory;
//! 3. TCP connections (and bytes) of one full update — fetch, report, confirm — against the
//!    shell flow that opens one session per step.
//!
//! The baseline's server side is a plain copy of the configuration, `plain/config/`, and a
//! `plain/stamp` file, inside the same host's chroot, served by the same sshd.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::data::{text, Rng};
use crate::machine::{sftp, Machine, EXIT_NOOP, EXIT_UPDATED};
use crate::proc::run_ok;
use crate::relay::Relay;
use crate::server::{Scratch, Server};
use crate::table::{Row, Samples, Unit};
use crate::Config;

const HOST: &str = "big";
const FILES: usize = 400;
const TOTAL_BYTES: usize = 5_000_000;
const SEED: u64 = 2;

/// Fields drop in declaration order: sshd and accounts first, the directory last.
struct Wire {
    server: Server,
    relay: Relay,
    machine: Machine,
    _scratch: Scratch,
}

impl Wire {
    fn server(&self) -> &Server {
        &self.server
    }
    fn plain(&self) -> PathBuf {
        self.server().host_dir(HOST).join("plain")
    }
    fn sftp(&self, batch: &str) -> crate::proc::Run {
        sftp(
            self.server(),
            HOST,
            self.relay.port,
            &self.machine.base.join("known_hosts"),
            batch,
        )
    }
}

fn file_size() -> usize {
    TOTAL_BYTES / FILES
}

/// The configuration: configuration.nix reads payload.txt into the system (so changing it
/// means a real build, activation and confirmation), plus 398 modules; 400 files, 5 MB.
fn write_config(host_dir: &Path) {
    let mut rng = Rng::new(SEED);
    fs::create_dir_all(host_dir).unwrap();
    fs::write(
        host_dir.join("configuration.nix"),
        format!(
            "{{ ... }}: {{ hostName = \"{HOST}\"; payload = builtins.readFile ./payload.txt; }}\n"
        ),
    )
    .unwrap();
    fs::write(host_dir.join("payload.txt"), text(&mut rng, file_size())).unwrap();
    for i in 0..FILES - 2 {
        let d = host_dir.join(format!("modules/m{:02}", i / 20));
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join(format!("mod{i:03}.nix")),
            text(&mut rng, file_size()),
        )
        .unwrap();
    }
}

/// Mirrors the fleet's host directory into `plain/config/` and bumps `plain/stamp`, the
/// way the shell set-up publishes.
fn publish_plain(w: &Wire, stamp: &str) {
    let plain = w.plain();
    fs::create_dir_all(&plain).unwrap();
    let _ = fs::remove_dir_all(plain.join("config"));
    run_ok(
        Command::new("cp")
            .arg("-r")
            .arg(w.server().fleet().join("hosts").join(HOST))
            .arg(plain.join("config")),
        Duration::from_secs(60),
    );
    fs::write(plain.join("stamp"), format!("{stamp}\n")).unwrap();
}

fn setup(scratch: Scratch) -> Wire {
    let server = Server::start(&scratch.join("srv"), &[HOST.to_owned()]);
    write_config(&server.fleet().join("hosts").join(HOST));
    server.publish();
    let relay = Relay::start(server.port);
    let machine = Machine::new(&server, HOST, &scratch.join("machine"), relay.port);
    let w = Wire {
        server,
        relay,
        machine,
        _scratch: scratch,
    };
    publish_plain(&w, "0");
    // First install: everything is fetched once; the measurements start from an applied
    // version, as on a machine that has been running for a while.
    w.machine.update_expect(EXIT_UPDATED);
    w
}

pub fn run(cfg: &Config, rows: &mut Vec<Row>) {
    let w = setup(Scratch::new("wire"));
    let reps = cfg.reps;
    let plain_poll = cfg.wants(1).then(|| no_change_poll(&w, reps, rows));
    if cfg.wants(2) || cfg.wants(3) {
        one_file_changed(cfg, &w, reps, rows);
    }
    if cfg.wants(2) {
        one_file_changed_format_2(&w, reps, rows);
    }
    // Last: it signs the fleet and turns freshness on, which the scenarios above do not use.
    if let Some(plain) = plain_poll {
        fresh_poll(&w, reps, plain, rows);
    }
}

/// Scenario 1 again with `[server] freshness` (issue #27): a no-change poll whose stamp the
/// agent remembers (the usual poll: it is fetched again only when half its window is gone),
/// and one that fetches it (the state's remembered stamp removed first), each against the
/// plain poll's median bytes.
fn fresh_poll(w: &Wire, reps: usize, plain: f64, rows: &mut Vec<Row>) {
    let server = w.server();
    let key = w.machine.base.join("signing-key");
    let out = run_ok(
        crate::server::bento()
            .args(["keygen", "--output"])
            .arg(&key),
        Duration::from_secs(30),
    );
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let toml = server.fleet().join("bento.toml");
    let text = fs::read_to_string(&toml).unwrap().replacen(
        "[server]\n",
        &format!(
            "[server]\nsigning_key = \"{}\"\nfreshness = \"7d\"\n",
            key.display()
        ),
        1,
    );
    fs::write(&toml, text).unwrap();
    let agent_toml = w.machine.base.join("agent.toml");
    let mut agent = fs::read_to_string(&agent_toml).unwrap();
    agent.push_str(&format!("trusted_keys = [\"{public}\"]\n"));
    fs::write(&agent_toml, agent).unwrap();
    // The settings now carry the window: a new version, applied once.
    server.publish();
    w.machine.update_expect(EXIT_UPDATED);
    w.machine.update_expect(EXIT_NOOP);
    let state_file = w.machine.base.join("state/state.json");
    let (mut remembered, mut fetched) = (Samples::default(), Samples::default());
    for _ in 0..reps {
        w.relay.reset();
        w.machine.update_expect(EXIT_NOOP);
        remembered.push(w.relay.connections().iter().map(|c| c.total()).sum::<u64>() as f64);

        let mut state: serde_json::Value =
            serde_json::from_slice(&fs::read(&state_file).unwrap()).unwrap();
        state.as_object_mut().unwrap().remove("fresh");
        fs::write(&state_file, serde_json::to_vec(&state).unwrap()).unwrap();
        w.relay.reset();
        w.machine.update_expect(EXIT_NOOP);
        fetched.push(w.relay.connections().iter().map(|c| c.total()).sum::<u64>() as f64);
    }
    let s = "1. no-change poll";
    let r = remembered.median() / plain;
    rows.push(
        Row::new(s, "with freshness: bytes (stamp remembered)", Unit::Bytes)
            .bento(remembered)
            .goal(format!("≤ 1.05× the poll without; {r:.3}×"), r <= 1.05),
    );
    let f = fetched.median() / plain;
    rows.push(
        Row::new(
            s,
            "with freshness: bytes (stamp fetched, once per half window)",
            Unit::Bytes,
        )
        .bento(fetched)
        .goal(format!("{f:.3}× the poll without"), true),
    );
}

/// Returns the median bytes of bento's poll, for the poll with freshness.
fn no_change_poll(w: &Wire, reps: usize, rows: &mut Vec<Row>) -> f64 {
    let (mut fb, mut ft) = (Samples::default(), Samples::default());
    let (mut bb, mut bt) = (Samples::default(), Samples::default());
    let (mut pb, mut pt) = (Samples::default(), Samples::default());
    let mut conns = Samples::default();
    // Warm-up, not counted: page cache, sshd's first fork.
    w.sftp("bye\n");
    w.machine.update_expect(EXIT_NOOP);
    for _ in 0..reps {
        w.relay.reset();
        let r = w.sftp("bye\n");
        assert!(r.status.success(), "bare sftp: {}", r.text());
        fb.push(w.relay.connections().iter().map(|c| c.total()).sum::<u64>() as f64);
        ft.push(r.elapsed.as_secs_f64());

        w.relay.reset();
        let r = w.sftp("ls -l plain/stamp\n");
        assert!(
            String::from_utf8_lossy(&r.stdout).contains("stamp"),
            "sftp ls: {}",
            r.text()
        );
        pb.push(w.relay.connections().iter().map(|c| c.total()).sum::<u64>() as f64);
        pt.push(r.elapsed.as_secs_f64());

        w.relay.reset();
        let r = w.machine.update_expect(EXIT_NOOP);
        let c = w.relay.connections();
        conns.push(c.len() as f64);
        bb.push(c.iter().map(|c| c.total()).sum::<u64>() as f64);
        bt.push(r.elapsed.as_secs_f64());
    }
    let s = "1. no-change poll";
    let (floor_b, floor_t) = (fb.median(), ft.median());
    rows.push(Row::new(s, "floor: bare ssh+sftp connect, quit — bytes", Unit::Bytes).baseline(fb));
    rows.push(Row::new(s, "floor — wall time", Unit::Secs).baseline(ft));
    let plain_median = bb.median();
    let rb = plain_median / floor_b;
    rows.push(
        Row::new(s, "bytes on the wire (both ways)", Unit::Bytes)
            .bento(bb)
            .baseline(pb)
            .goal(
                format!("≤ 1.10× floor; bento is {rb:.2}× floor"),
                rb <= 1.10,
            ),
    );
    let rt = bt.median() / floor_t;
    rows.push(
        Row::new(s, "wall time", Unit::Secs)
            .bento(bt)
            .baseline(pt)
            .goal(
                format!("≤ 1.10× floor; bento is {rt:.2}× floor"),
                rt <= 1.10,
            ),
    );
    rows.push(Row::new(s, "TCP connections", Unit::Count).bento(conns));
    plain_median
}

fn one_file_changed(cfg: &Config, w: &Wire, reps: usize, rows: &mut Vec<Row>) {
    let server = w.server();
    let payload = server.fleet().join("hosts").join(HOST).join("payload.txt");
    let mut rng = Rng::new(SEED + 100);
    let (mut b_update, mut b_all, mut b_conns, mut budgets) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    let (mut p_get, mut p_all, mut p_conns) =
        (Samples::default(), Samples::default(), Samples::default());
    let local = w.machine.base.join("plain-copy");
    let report = w.machine.base.join("report.json");
    fs::write(&report, text(&mut rng, 1000)).unwrap();
    let floor = sftp_floor(w);
    for rep in 0..reps {
        // One file of 400 changes; it is read into the system, so this is a full update.
        let new = text(&mut rng, file_size());
        fs::write(&payload, &new).unwrap();
        server.publish();
        let manifest_len = live_manifest_len(&server.host_dir(HOST));
        budgets.push((new.len() as u64 + manifest_len + floor) as f64);
        w.relay.reset();
        w.machine.update_expect(EXIT_UPDATED);
        let c = w.relay.connections();
        b_update.push(c.first().map_or(0, |c| c.total()) as f64);
        b_all.push(c.iter().map(|c| c.total()).sum::<u64>() as f64);
        b_conns.push(c.len() as f64);

        // The shell flow: poll the stamp, get the whole directory, "activate", confirm with
        // a fresh session, put the report: one session per step.
        publish_plain(w, &(rep + 1).to_string());
        let _ = fs::remove_dir_all(&local);
        w.relay.reset();
        let r = w.sftp("get plain/stamp /dev/null\n");
        assert!(r.status.success(), "{}", r.text());
        let r = w.sftp(&format!("get -R plain/config {}\n", local.display()));
        assert!(r.status.success(), "sftp get -R: {}", r.text());
        let get = w.relay.connections()[1].total();
        let r = w.sftp("ls -l plain/stamp\n");
        assert!(r.status.success(), "{}", r.text());
        let r = w.sftp(&format!(
            "put {} logs/report-{rep}.json\n",
            report.display()
        ));
        assert!(r.status.success(), "sftp put: {}", r.text());
        let c = w.relay.connections();
        p_get.push(get as f64);
        p_all.push(c.iter().map(|c| c.total()).sum::<u64>() as f64);
        p_conns.push(c.len() as f64);
    }
    if cfg.wants(2) {
        let s = format!(
            "2. one file of {FILES} ({} MB) changed",
            TOTAL_BYTES / 1_000_000
        );
        let ratio = p_get.median() / b_update.median();
        let budget = budgets.median();
        let within = b_update.max() <= budgets.min();
        rows.push(
            Row::new(
                &s,
                "bytes: bento's update connection vs `sftp get -R` of the directory",
                Unit::Bytes,
            )
            .bento(b_update.clone())
            .baseline(p_get)
            .goal(format!("≥ 50× fewer; {ratio:.0}×"), ratio >= 50.0),
        );
        rows.push(
            Row::new(&s, "bento's update connection vs its budget", Unit::Bytes)
                .bento(b_update)
                .goal(
                    format!(
                        "≤ changed file + manifest + floor = {}",
                        crate::table::fmt_value(budget, Unit::Bytes)
                    ),
                    within,
                ),
        );
    }
    if cfg.wants(3) {
        let s = "3. one full update (fetch, report, confirm)";
        let fewer = b_conns.max() < p_conns.min();
        rows.push(
            Row::new(s, "TCP connections", Unit::Count)
                .bento(b_conns)
                .baseline(p_conns)
                .goal("fewer than one per step", fewer),
        );
        rows.push(
            Row::new(s, "bytes, all connections", Unit::Bytes)
                .bento(b_all)
                .baseline(p_all),
        );
    }
}

/// Bytes of a bare ssh+sftp connect and quit: the floor every budget includes.
fn sftp_floor(w: &Wire) -> u64 {
    w.relay.reset();
    w.sftp("bye\n");
    w.relay.connections().iter().map(|c| c.total()).sum()
}

/// The size of the live manifest of the host directory `host_dir`.
fn live_manifest_len(host_dir: &Path) -> u64 {
    let current = fs::read_to_string(host_dir.join("current")).unwrap();
    let name = format!("{}.json", current.trim());
    fs::metadata(host_dir.join("manifests").join(name))
        .unwrap()
        .len()
}

/// The object files of the host's directory.
fn object_names(host_dir: &Path) -> std::collections::BTreeSet<String> {
    fs::read_dir(host_dir.join("objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Scenario 2 again with `[server] format = 2` (issue #26): the same file changes; the
/// agent reads the new manifest, the new trees above the file and the file's range of its
/// pack. Budget: the file + the new trees + the manifest + the no-change floor.
fn one_file_changed_format_2(w: &Wire, reps: usize, rows: &mut Vec<Row>) {
    let server = w.server();
    let toml = server.fleet().join("bento.toml");
    let text_now = fs::read_to_string(&toml).unwrap();
    fs::write(
        &toml,
        text_now.replacen("[server]\n", "[server]\nformat = 2\n", 1),
    )
    .unwrap();
    server.publish();
    w.machine.update_expect(EXIT_UPDATED);
    let payload = server.fleet().join("hosts").join(HOST).join("payload.txt");
    let mut rng = Rng::new(SEED + 200);
    let floor = sftp_floor(w);
    let host_dir = server.host_dir(HOST);
    let (mut update, mut budgets, mut get) =
        (Samples::default(), Samples::default(), Samples::default());
    for _ in 0..reps {
        let before = object_names(&host_dir);
        let new = text(&mut rng, file_size());
        fs::write(&payload, &new).unwrap();
        server.publish();
        let manifest_len = live_manifest_len(&host_dir);
        let trees: u64 = object_names(&host_dir)
            .difference(&before)
            .map(|n| fs::read(host_dir.join("objects").join(n)).unwrap())
            .filter(|b| b.starts_with(b"{\"format\":2,\"entries\""))
            .map(|b| b.len() as u64)
            .sum();
        budgets.push((new.len() as u64 + trees + manifest_len + floor) as f64);
        w.relay.reset();
        w.machine.update_expect(EXIT_UPDATED);
        update.push(w.relay.connections().first().map_or(0, |c| c.total()) as f64);
        // What the shell way moves for the same change: the whole directory.
        publish_plain(w, "f2");
        let local = w.machine.base.join("plain-copy-2");
        let _ = fs::remove_dir_all(&local);
        w.relay.reset();
        let r = w.sftp(&format!("get -R plain/config {}\n", local.display()));
        assert!(r.status.success(), "sftp get -R: {}", r.text());
        get.push(w.relay.connections()[0].total() as f64);
    }
    let s = format!(
        "2. one file of {FILES} ({} MB) changed",
        TOTAL_BYTES / 1_000_000
    );
    let ratio = get.median() / update.median();
    rows.push(
        Row::new(
            &s,
            "format 2: bento's update connection vs `sftp get -R` of the directory",
            Unit::Bytes,
        )
        .bento(update.clone())
        .baseline(get)
        .goal(format!("≥ 100× fewer; {ratio:.0}×"), ratio >= 100.0),
    );
    let r = update.median() / budgets.median();
    rows.push(
        Row::new(&s, "format 2: update connection vs its budget", Unit::Bytes)
            .bento(update)
            .goal(
                format!(
                    "≤ 1.1 × (file + new trees + manifest + floor = {}); {r:.3}×",
                    crate::table::fmt_value(budgets.median(), Unit::Bytes)
                ),
                r <= 1.1,
            ),
    );
}
