//! Fault injection over the real sshd harness and real Nix builds of toy systems: the
//! connection or sshd killed during a download, during the report upload and after
//! activation; the state directory's disk full during download and during build; the clock
//! jumping backwards; the agent SIGKILLed at every step of a run; publish killed while hosts
//! download. After every fault the next normal runs must converge: the host runs the latest
//! published system (profile, running system, state.json and installed files agree), the
//! spool is empty, and every report of a run that tried a version is in `logs/reports/`
//! exactly once. Each fault is counted (`common::faults::record`); the totals are printed
//! when the test binary exits.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant, SystemTime};

use crate::agent::{code, fleet, text, write_version, Machine};
use crate::common::bento;
use crate::common::faults::{record, wait_until, Tmpfs};
use crate::common::relay::{Cut, Dir, Relay};
use crate::common::sshd::{wait_with_deadline, Sshd};

/// A signing fleet of toy flake hosts on a fresh sshd, version "1" published.
struct Fleet {
    sshd: Sshd,
    /// The fleet's public signing key, trusted by every host.
    trusted: String,
    /// Bytes of the per-version blob each host downloads.
    blob: usize,
    /// Host threads may publish (after a rollback) side by side; one writing the tree
    /// while the other's publish reads it is a publish bento rightly refuses.
    publishing: std::sync::Mutex<()>,
}

impl Fleet {
    fn start(hosts: &[&str], blob: usize) -> Fleet {
        let sshd = Sshd::start(hosts);
        let key = sshd.dir.join("signing/key");
        let out = bento()
            .arg("keygen")
            .arg("--output")
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let trusted = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let toml = sshd.fleet().join("bento.toml");
        let text = fs::read_to_string(&toml).unwrap().replacen(
            "[server]\n",
            &format!("[server]\nsigning_key = \"{}\"\n", key.display()),
            1,
        );
        fs::write(toml, text).unwrap();
        let f = Fleet {
            sshd,
            trusted,
            blob,
            publishing: std::sync::Mutex::new(()),
        };
        fleet(&f.sshd);
        f.publish("1");
        f
    }

    /// Publishes version `label`: a new system, a new secret and a new blob for every host.
    fn publish(&self, label: &str) {
        let _one_at_a_time = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        self.write(label);
        self.sshd.publish();
    }

    /// Writes version `label` into the fleet repo without publishing it.
    fn write(&self, label: &str) {
        write_version(&self.sshd, label);
        for h in &self.sshd.hosts {
            let dir = self.sshd.fleet().join("hosts").join(h);
            fs::write(
                dir.join("files").join(h).join("etc/bento-it/secret"),
                secret(h, label),
            )
            .unwrap();
            fs::write(dir.join("blob.bin"), blob(label, self.blob)).unwrap();
        }
    }

    /// The live digest of `host`.
    fn live(&self, host: &str) -> bento::protocol::manifest::Digest {
        bento::protocol::layout::parse_current(
            &fs::read_to_string(self.sshd.host_dir(host).join("current")).unwrap(),
        )
        .unwrap()
    }
}

fn secret(host: &str, label: &str) -> String {
    format!("secret of {host}, version {label}\n")
}

/// Incompressible bytes that differ per version (ssh compresses nothing by default, but
/// the point is that every version's blob is a new object).
fn blob(label: &str, len: usize) -> Vec<u8> {
    let seed = bento::protocol::manifest::Digest::of(label.as_bytes()).to_hex();
    let mut x = u64::from_str_radix(&seed[..16], 16).unwrap() | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// One managed machine behind its own relay, with a simulated `/run/current-system` that
/// only activation moves (so a profile set but never activated is not mistaken for the
/// running system), and a ledger of the reports that must arrive.
struct Host<'a> {
    m: Machine<'a>,
    relay: Relay,
    /// Ids of every report a run created (seen in state.json, the spool or logs/).
    known: BTreeSet<String>,
}

impl<'a> Host<'a> {
    fn new(fleet: &'a Fleet, name: &str) -> Host<'a> {
        let relay = Relay::start(fleet.sshd.port);
        let m = Machine::new(&fleet.sshd, name, "").via(relay.port);
        let base = m.base.clone();
        let cfg = fs::read_to_string(m.config()).unwrap();
        let cfg = cfg.replace(
            &format!("current_system = \"{}/no-current-system\"", base.display()),
            &format!("current_system = \"{}/current-system\"", base.display()),
        );
        assert!(cfg.contains("/current-system\""), "{cfg}");
        fs::write(
            m.config(),
            format!("{cfg}trusted_keys = [\"{}\"]\n", fleet.trusted),
        )
        .unwrap();
        let hook = base.join("hook.sh");
        fs::write(
            &hook,
            format!(
                "#!/bin/sh\n\
                 # $1: action, $2: the system being activated\n\
                 echo \"begin $1 $2\" >> {base}/hook.log\n\
                 if [ -n \"${{FAULT_ACTIVATION_DELAY:-}}\" ]; then sleep \"$FAULT_ACTIVATION_DELAY\"; fi\n\
                 case \"$1\" in switch|test) ln -sfn \"$2\" {base}/.cs && mv -Tf {base}/.cs {base}/current-system ;; esac\n\
                 # A test that must act between activation and the confirmation opens the gate.\n\
                 if [ -n \"${{FAULT_GATE:-}}\" ]; then n=0; while [ ! -e \"$FAULT_GATE\" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done; fi\n\
                 echo \"end $1 $2\" >> {base}/hook.log\n",
                base = base.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
        Host {
            m,
            relay,
            known: BTreeSet::new(),
        }
    }

    fn name(&self) -> &str {
        &self.m.host
    }

    fn base(&self) -> &Path {
        &self.m.base
    }

    fn state_dir(&self) -> PathBuf {
        self.m.base.join("state")
    }

    /// `bento agent update` as the timer would run it (plus `env`).
    fn command(&self, env: &[(&str, &str)]) -> Command {
        let hook = self.m.base.join("hook.sh");
        let mut all = vec![("BENTO_TEST_HOOK", hook.to_str().unwrap())];
        all.extend_from_slice(env);
        self.m.command(&all)
    }

    fn spawn(&self, env: &[(&str, &str)]) -> Child {
        self.command(env).spawn().expect("spawn bento agent update")
    }

    fn run(&self) -> Output {
        wait_with_deadline(self.spawn(&[]), Duration::from_secs(120))
            .expect("agent update finished within 120 s")
    }

    fn spool_ids(&self) -> BTreeSet<String> {
        ids_in(&self.state_dir().join("spool"))
    }

    fn log_ids(&self) -> BTreeSet<String> {
        ids_in(&self.m.logs().join("reports"))
    }

    fn last_id(&self) -> Option<String> {
        let bytes = fs::read(self.state_dir().join("state.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        v["last"]["id"].as_str().map(str::to_owned)
    }

    /// Adds every report a run created to the ledger; a run creates at most one.
    fn account(&mut self, what: &str) -> Result<(), String> {
        let mut seen = self.spool_ids();
        seen.extend(self.log_ids());
        seen.extend(self.last_id());
        let new: Vec<String> = seen.difference(&self.known).cloned().collect();
        if new.len() > 1 {
            return Err(format!("{what}: one run created several reports: {new:?}"));
        }
        self.known.extend(new);
        Ok(())
    }

    /// Runs normal updates (at most four) until the host has converged on version
    /// `label`; returns why not otherwise.
    fn settle(&mut self, fleet: &Fleet, label: &str) -> Result<(), String> {
        let mut last = String::new();
        for _ in 0..4 {
            let out = self.run();
            self.account("a normal run")?;
            match code(&out) {
                0 | 10 => match self.check(fleet, label) {
                    Ok(()) => return Ok(()),
                    Err(e) => last = format!("{e}\n{}", text(&out)),
                },
                // A lost connection before any attempt: try again, as the timer would.
                1 => last = text(&out),
                _ => return Err(format!("a normal run did not succeed:\n{}", text(&out))),
            }
        }
        Err(format!("not converged after 4 runs: {last}"))
    }

    /// The converged state: everything agrees on version `label`, nothing is left to send.
    fn check(&self, fleet: &Fleet, label: &str) -> Result<(), String> {
        let name = self.name();
        let live = fleet.live(name);
        let profile = self.m.profile_target().ok_or("no profile")?;
        if !profile.ends_with(&format!("-{name}-{label}")) {
            return Err(format!("profile is {profile}, not version {label}"));
        }
        // (In-process runs activate without the hook: no simulated running system.)
        let link = self.base().join("current-system");
        let running = canonical(&link);
        if link.exists() && running != profile {
            return Err(format!(
                "running {running} but the profile is {profile}: half-updated"
            ));
        }
        let state = self.m.state();
        if state["applied"]["version"].as_str() != Some(&live.to_hex())
            || state["applied"]["system"].as_str() != Some(profile.as_str())
        {
            return Err(format!("state.json does not match: {state}"));
        }
        let secret_now =
            fs::read_to_string(self.base().join("root/etc/bento-it/secret")).unwrap_or_default();
        if secret_now != secret(name, label) {
            return Err(format!("installed secret is {secret_now:?}"));
        }
        if let Some(last) = self.m.activations().last() {
            if last != &format!("switch {profile}") {
                return Err(format!("last activation {last:?}, profile {profile}"));
            }
        }
        let spool = self.spool_ids();
        if !spool.is_empty() {
            return Err(format!("spool not empty: {spool:?}"));
        }
        let logs = self.log_ids();
        let lost: BTreeSet<String> = self.known.difference(&logs).cloned().collect();
        if !logs.is_subset(&self.known) || !lost.is_empty() {
            return Err(format!(
                "reports on the server {logs:?}, reports created {:?}",
                self.known
            ));
        }
        for id in &logs {
            let dir = self.m.logs().join("reports");
            let r = bento::protocol::report::Report::parse(
                &fs::read(dir.join(format!("{id}.json"))).unwrap(),
            )
            .map_err(|e| format!("report {id}: {e}"))?;
            if &r.id != id || !dir.join(format!("{id}.log.gz")).is_file() {
                return Err(format!("report {id} is incomplete"));
            }
        }
        let hb: serde_json::Value = serde_json::from_slice(
            &fs::read(self.m.logs().join("heartbeat.json")).unwrap_or_default(),
        )
        .unwrap_or_default();
        if hb["version"].as_str() != Some(&live.to_hex()) {
            return Err(format!("heartbeat says {hb}"));
        }
        Ok(())
    }
}

/// Report ids in a spool or reports directory (`<id>.json`, temporary files ignored).
fn ids_in(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let id = name.strip_suffix(".json")?;
                (!id.starts_with('.')).then(|| id.to_owned())
            })
            .collect()
        })
        .unwrap_or_default()
}

/// The steps of one run, in order, each recognised by what it leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// Lock taken, connecting (a few milliseconds after start).
    Start,
    /// The TCP connection to the server is open (SSH handshake, SFTP, `current`).
    Connected,
    /// The manifest is verified and saved in the state directory.
    Manifest,
    /// An object is half downloaded (`objects/.partial-*`).
    Downloading,
    /// The configuration tree is being staged or is staged.
    Staging,
    /// `config/current` names the new version.
    Swapped,
    /// `nix` runs below the agent.
    Building,
    /// The new version's secret is installed.
    Files,
    /// The system profile points at the new system.
    Profile,
    /// `switch-to-configuration` has started.
    Activating,
    /// The new system runs.
    Activated,
    /// The fresh connection of the confirmation is open.
    Confirming,
    /// state.json records the new version.
    Saved,
    /// The report is in the spool.
    Spooled,
    /// The report reached `logs/reports/`.
    Delivered,
}

const STEPS: [Step; 15] = [
    Step::Start,
    Step::Connected,
    Step::Manifest,
    Step::Downloading,
    Step::Staging,
    Step::Swapped,
    Step::Building,
    Step::Files,
    Step::Profile,
    Step::Activating,
    Step::Activated,
    Step::Confirming,
    Step::Saved,
    Step::Spooled,
    Step::Delivered,
];

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn canonical(p: &Path) -> String {
    fs::canonicalize(p)
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

impl Host<'_> {
    /// Whether the run (agent `pid`) applying version `label` (digest `live`) got to `step`.
    fn reached(&self, step: Step, pid: u32, live: &str, label: &str, logs_before: usize) -> bool {
        let state = self.state_dir();
        let suffix = format!("-{}-{label}", self.name());
        match step {
            Step::Start => true,
            Step::Connected => !self.relay.connections().is_empty(),
            Step::Manifest => state.join(format!("manifests/{live}.json")).exists(),
            Step::Downloading => fs::read_dir(state.join("objects")).is_ok_and(|rd| {
                rd.flatten().any(|e| {
                    e.file_name().to_string_lossy().starts_with(".partial-")
                        && e.metadata().is_ok_and(|m| m.len() > 0)
                })
            }),
            Step::Staging => {
                state.join(format!("config/.staging-{live}")).exists()
                    || state.join(format!("config/{live}")).exists()
            }
            Step::Swapped => {
                fs::read_link(state.join("config/current")).is_ok_and(|t| t.as_os_str() == live)
            }
            Step::Building => crate::common::faults::descendants(pid)
                .iter()
                .any(|p| comm(*p).starts_with("nix")),
            Step::Files => {
                fs::read_to_string(self.base().join("root/etc/bento-it/secret")).ok()
                    == Some(secret(self.name(), label))
            }
            Step::Profile => self
                .m
                .profile_target()
                .is_some_and(|p| p.ends_with(&suffix)),
            Step::Activating => fs::read_to_string(self.base().join("hook.log")).is_ok_and(|l| {
                l.lines()
                    .any(|l| l.starts_with("begin switch") && l.ends_with(&suffix))
            }),
            Step::Activated => canonical(&self.base().join("current-system")).ends_with(&suffix),
            Step::Confirming => self.relay.connections().len() >= 2,
            Step::Saved => fs::read(state.join("state.json")).is_ok_and(|b| {
                serde_json::from_slice::<serde_json::Value>(&b)
                    .is_ok_and(|v| v["applied"]["version"].as_str() == Some(live))
            }),
            Step::Spooled => !self.spool_ids().is_empty(),
            Step::Delivered => self.log_ids().len() > logs_before,
        }
    }

    /// Starts a run for version `label` and SIGKILLs it `jitter` after it reaches `step`.
    /// Returns whether it was killed (false: it finished before getting there). Waits for
    /// what the killed agent left running (nix, switch-to-configuration), as a reboot
    /// would end them.
    fn kill_at(&mut self, fleet: &Fleet, step: Step, label: &str, jitter: Duration) -> bool {
        self.relay.reset();
        let live = fleet.live(self.name()).to_hex();
        let logs_before = self.log_ids().len();
        let log = fs::File::create(self.base().join("killed-run.log")).unwrap();
        let mut child = self
            .command(&[("FAULT_ACTIVATION_DELAY", "0.3")])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut exited = false;
        wait_until(Duration::from_secs(60), || {
            exited = child.try_wait().unwrap().is_some();
            exited || self.reached(step, pid, &live, label, logs_before)
        });
        if !jitter.is_zero() && !exited {
            std::thread::sleep(jitter);
        }
        let killed = kill_and_reap(&mut child);
        let _ = self.account("a killed run");
        killed
    }
}

/// SIGKILLs `child` unless it already exited, then waits until what it started (except its
/// lingering SSH control master) has ended too. Returns whether it was killed.
fn kill_and_reap(child: &mut Child) -> bool {
    let pid = child.id();
    let below: Vec<u32> = crate::common::faults::descendants(pid)
        .into_iter()
        .filter(|p| comm(*p) != "ssh")
        .collect();
    let killed = child.try_wait().unwrap().is_none();
    if killed {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    child.wait().unwrap();
    wait_until(Duration::from_secs(30), || {
        below
            .iter()
            .all(|p| !Path::new(&format!("/proc/{p}")).exists() || comm(*p).is_empty())
    });
    killed
}

/// Runs `f` for each host in its own thread (the machines of a fleet act in parallel).
fn each_host<'a, T: Send>(hosts: &mut [Host<'a>], f: impl Fn(&mut Host<'a>) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter_mut()
            .map(|h| {
                let f = &f;
                s.spawn(move || f(h))
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

/// Settles `h` on `label` after `fault`, counting the fault; panics with the story if the
/// host does not converge.
fn converge(h: &mut Host<'_>, fleet: &Fleet, label: &str, fault: &str) {
    converge_if(h, fleet, label, fault, true);
}

/// `converge`, counting a fault only when one was `injected` (the run may have finished
/// before the fault's moment).
fn converge_if(h: &mut Host<'_>, fleet: &Fleet, label: &str, fault: &str, injected: bool) {
    h.relay.throttle(0);
    h.relay.set_down(false);
    h.relay.reset();
    let result = h.settle(fleet, label);
    if injected {
        record(result.is_ok());
    }
    if let Err(e) = result {
        panic!(
            "{}: after {fault}: {e}\n--- killed/faulted run's log\n{}",
            h.name(),
            fs::read_to_string(h.base().join("killed-run.log")).unwrap_or_default()
        );
    }
}

/// The agent SIGKILLed at each step of a run (two hosts, two passes with different delays
/// after the step is seen), then at random moments spread over a measured run.
#[test]
fn agent_killed_at_every_step() {
    let fleet = Fleet::start(&["k1", "k2"], 192 * 1024);
    let mut hosts = vec![Host::new(&fleet, "k1"), Host::new(&fleet, "k2")];
    each_host(&mut hosts, |h| {
        converge_if(h, &fleet, "1", "nothing", false)
    });
    let mut n = 1;
    let mut injected = 0;
    let mut run_time = Duration::ZERO;
    for pass in 0..2u64 {
        for (i, step) in STEPS.iter().enumerate() {
            n += 1;
            let label = n.to_string();
            fleet.publish(&label);
            let killed = each_host(&mut hosts, |h| {
                // Slow the wire so downloads and uploads can be caught in the act.
                h.relay
                    .throttle(if *step >= Step::Activated { 64 } else { 1024 } * 1024);
                let jitter = Duration::from_millis((pass * 7 + i as u64 * 3) % 11);
                let killed = h.kill_at(&fleet, *step, &label, jitter);
                let t = Instant::now();
                converge_if(h, &fleet, &label, &format!("SIGKILL at {step:?}"), killed);
                (killed, t.elapsed())
            });
            for (k, t) in killed {
                injected += k as usize;
                run_time = run_time.max(t);
            }
        }
    }
    // Random moments over a whole run (seeded, so a failure replays).
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xb3e70);
    for _ in 0..14 {
        n += 1;
        let label = n.to_string();
        fleet.publish(&label);
        let delays: Vec<u64> = (0..2)
            .map(|_| rng.gen_range(0..run_time.as_millis() as u64 + 1))
            .collect();
        let killed = each_host(&mut hosts, |h| {
            let d = delays[(h.name() == "k2") as usize];
            let k = h.kill_at(&fleet, Step::Start, &label, Duration::from_millis(d));
            converge_if(h, &fleet, &label, &format!("SIGKILL after {d} ms"), k);
            k
        });
        injected += killed.iter().filter(|k| **k).count();
    }
    assert!(injected >= 50, "only {injected} kills landed");
}

/// The report is spooled before state.json records the run, so a SIGKILL right after the
/// state is saved loses nothing: the next runs deliver it.
#[test]
fn a_kill_right_after_the_state_is_saved_loses_no_report() {
    let fleet = Fleet::start(&["lost"], 1024);
    let mut h = Host::new(&fleet, "lost");
    converge_if(&mut h, &fleet, "1", "nothing", false);
    let mut landed = 0;
    for n in 2..8 {
        let label = n.to_string();
        fleet.publish(&label);
        h.relay.throttle(64 * 1024);
        let killed = h.kill_at(&fleet, Step::Saved, &label, Duration::ZERO);
        h.relay.throttle(0);
        h.relay.reset();
        converge_if(
            &mut h,
            &fleet,
            &label,
            "SIGKILL after state.json was saved",
            killed,
        );
        landed += killed as usize;
    }
    assert!(
        landed > 0,
        "no kill landed right after state.json was saved"
    );
}

/// Traffic of a normal run of `h` applying a fresh version: (download bytes of the first
/// connection, upload bytes of the confirmation's connection).
fn measure(h: &mut Host<'_>, fleet: &Fleet, label: &str) -> (u64, u64) {
    h.relay.reset();
    let out = h.run();
    assert_eq!(code(&out), 10, "{}", text(&out));
    h.account("a measured run").unwrap();
    h.check(fleet, label).unwrap();
    let c = h.relay.connections();
    assert_eq!(c.len(), 2, "{c:?}");
    (c[0].down, c[1].up)
}

/// The connection cut after an exact number of bytes: during the download (anywhere in
/// the first connection: handshake, `current`, manifest, signature, objects) and during
/// the report upload (the confirmation's connection); then the server lost right after
/// activation, briefly (the confirmation retries) and for longer than `confirm_timeout`
/// (rollback, report delivered later, the version not retried until a newer one).
#[test]
fn connection_cut_during_download_upload_and_after_activation() {
    use rand::{Rng, SeedableRng};
    let fleet = Fleet::start(&["c1", "c2"], 160 * 1024);
    let mut hosts = vec![Host::new(&fleet, "c1"), Host::new(&fleet, "c2")];
    each_host(&mut hosts, |h| {
        converge_if(h, &fleet, "1", "nothing", false)
    });
    fleet.publish("2");
    let sizes = each_host(&mut hosts, |h| measure(h, &fleet, "2"));
    let mut n = 2;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xc07);
    for round in 0..18 {
        n += 1;
        let label = n.to_string();
        fleet.publish(&label);
        let cuts: Vec<Cut> = sizes
            .iter()
            .map(|(down, up)| {
                if round % 3 == 2 {
                    Cut {
                        conn: 1,
                        dir: Dir::Up,
                        bytes: rng.gen_range(1..*up),
                    }
                } else {
                    Cut {
                        conn: 0,
                        dir: Dir::Down,
                        bytes: rng.gen_range(1..*down),
                    }
                }
            })
            .collect();
        each_host(&mut hosts, |h| {
            let cut = cuts[(h.name() == "c2") as usize];
            h.relay.reset();
            h.relay.cut_after(cut);
            let out = h.run();
            fs::write(h.base().join("killed-run.log"), text(&out)).unwrap();
            h.account("a cut run").unwrap();
            if h.relay.cut_fired() {
                converge(h, &fleet, &label, &format!("{cut:?}"));
            } else {
                h.check(&fleet, &label).unwrap();
            }
        });
    }
    // The server lost right after activation: for 1 s (< confirm_timeout 3 s) the
    // confirmation retries and succeeds; for 6 s the agent rolls back.
    for (outage, rounds) in [(Duration::from_secs(1), 3), (Duration::from_secs(6), 1)] {
        for _ in 0..rounds {
            n += 1;
            let label = n.to_string();
            fleet.publish(&label);
            each_host(&mut hosts, |h| {
                let before = h.m.profile_target().unwrap();
                let suffix = format!("-{}-{label}", h.name());
                // The activation waits at a gate until the server is gone, so the
                // confirmation cannot slip through before the outage starts.
                let gate = h.base().join("gate");
                let _ = fs::remove_file(&gate);
                let gate_env = gate.display().to_string();
                let child = h.spawn(&[("FAULT_GATE", gate_env.as_str())]);
                assert!(wait_until(Duration::from_secs(60), || canonical(
                    &h.base().join("current-system")
                )
                .ends_with(&suffix)));
                h.relay.set_down(true);
                fs::write(&gate, "").unwrap();
                std::thread::sleep(outage);
                h.relay.set_down(false);
                let out = wait_with_deadline(child, Duration::from_secs(60)).unwrap();
                h.account("a run that lost the server").unwrap();
                if outage < Duration::from_secs(3) {
                    assert_eq!(code(&out), 10, "{}", text(&out));
                    converge(h, &fleet, &label, "a 1 s outage after activation");
                } else {
                    assert_eq!(code(&out), 12, "{}", text(&out));
                    assert_eq!(
                        h.m.profile_target().unwrap(),
                        before,
                        "back on the exact previous system"
                    );
                    assert_eq!(canonical(&h.base().join("current-system")), before);
                    // The next run delivers the rollback report and leaves the version be
                    // (or applies the next one, if the other host's closure, running
                    // alongside, has published it already).
                    let out = h.run();
                    let said = String::from_utf8_lossy(&out.stdout).into_owned();
                    assert!(
                        said.contains("rolled back") || said.contains(&format!("-{label}n)")),
                        "{}",
                        text(&out)
                    );
                    h.account("a run after a rollback").unwrap();
                    assert!(h.spool_ids().is_empty() && h.log_ids() == h.known);
                    let next = format!("{label}n");
                    fleet.publish(&next);
                    converge(h, &fleet, &next, "a 6 s outage after activation (rollback)");
                }
            });
        }
    }
}

/// sshd's per-connection processes SIGKILLed (the listener survives, as after a crash of
/// the session) while objects download, right after activation, and while the report is
/// being delivered.
#[test]
fn sshd_killed_during_download_after_activation_and_during_upload() {
    let fleet = Fleet::start(&["s1"], 256 * 1024);
    let mut h = Host::new(&fleet, "s1");
    converge_if(&mut h, &fleet, "1", "nothing", false);
    let config = fleet.sshd.config();
    let mut n = 1;
    for round in 0..2u64 {
        for step in [Step::Downloading, Step::Activated, Step::Spooled] {
            n += 1;
            let label = n.to_string();
            fleet.publish(&label);
            h.relay.reset();
            h.relay.throttle(if step == Step::Downloading {
                1024 * 1024
            } else {
                32 * 1024
            });
            let live = fleet.live("s1").to_hex();
            let logs_before = h.log_ids().len();
            let child = h.spawn(&[]);
            let pid = child.id();
            let reached = wait_until(Duration::from_secs(60), || {
                h.reached(step, pid, &live, &label, logs_before)
            });
            std::thread::sleep(Duration::from_millis(round * 3));
            let killed = reached && crate::common::faults::kill_sshd_sessions(&config) > 0;
            let out = wait_with_deadline(child, Duration::from_secs(60)).unwrap();
            fs::write(h.base().join("killed-run.log"), text(&out)).unwrap();
            h.account("a run whose sshd died").unwrap();
            assert!(killed, "sshd was not killed at {step:?}: {}", text(&out));
            converge(&mut h, &fleet, &label, &format!("sshd killed at {step:?}"));
        }
    }
}

/// The state directory on a small tmpfs that fills up: before the run (so the manifest,
/// the objects or the staging run out of space) and while the system builds (so state.json,
/// the installed-files record or the spool do). Freed, the next runs converge.
#[test]
fn disk_full_during_download_and_build() {
    use rand::{Rng, SeedableRng};
    let fleet = Fleet::start(&["d1", "d2"], 192 * 1024);
    let mut hosts = vec![Host::new(&fleet, "d1"), Host::new(&fleet, "d2")];
    let disks: Vec<Tmpfs> = hosts
        .iter()
        .map(|h| Tmpfs::mount(&h.state_dir(), 4 * 1024 * 1024))
        .collect();
    each_host(&mut hosts, |h| {
        converge_if(h, &fleet, "1", "nothing", false)
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xd15c);
    let mut n = 1;
    for round in 0..10 {
        n += 1;
        let label = n.to_string();
        fleet.publish(&label);
        let spare: Vec<u64> = (0..2)
            .map(|_| {
                if round % 2 == 0 {
                    rng.gen_range(0..400 * 1024)
                } else {
                    rng.gen_range(0..16 * 1024)
                }
            })
            .collect();
        each_host(&mut hosts, |h| {
            let i = (h.name() == "d2") as usize;
            let disk = &disks[i];
            let live = fleet.live(h.name()).to_hex();
            let fault = if round % 2 == 0 {
                disk.fill(spare[i]);
                let out = h.run();
                fs::write(h.base().join("killed-run.log"), text(&out)).unwrap();
                format!("disk full before the download ({} bytes free)", spare[i])
            } else {
                let child = h.spawn(&[]);
                let pid = child.id();
                wait_until(Duration::from_secs(60), || {
                    h.reached(Step::Building, pid, &live, &label, 0)
                });
                disk.fill(spare[i]);
                let out = wait_with_deadline(child, Duration::from_secs(60)).unwrap();
                fs::write(h.base().join("killed-run.log"), text(&out)).unwrap();
                format!("disk full during the build ({} bytes free)", spare[i])
            };
            h.account("a run on a full disk").unwrap();
            disk.unfill();
            converge_after_backoff(h, &fleet, &label, &fault);
        });
    }
}

/// Like `converge`, but a version that failed because of the fault (a full disk is a
/// failure of the run, with the documented back-off) is retried with `--force`, as the
/// timer would retry it five minutes later.
fn converge_after_backoff(h: &mut Host<'_>, fleet: &Fleet, label: &str, fault: &str) {
    let out = h.run();
    h.account("a run after the fault").unwrap();
    if String::from_utf8_lossy(&out.stdout).contains("retrying in") {
        let out = wait_with_deadline(
            h.command(&[]).arg("--force").spawn().unwrap(),
            Duration::from_secs(120),
        )
        .unwrap();
        h.account("a forced retry").unwrap();
        assert!(matches!(code(&out), 0 | 10), "{fault}: {}", text(&out));
    }
    converge(h, fleet, label, fault);
}

/// `bento publish` SIGKILLed at random moments while two hosts download (slowly) the
/// version before; the hosts' runs end as they may, then a complete publish and normal
/// runs converge on it.
#[test]
fn publish_killed_while_hosts_download() {
    use rand::{Rng, SeedableRng};
    let fleet = Fleet::start(&["p1", "p2"], 384 * 1024);
    let mut hosts = vec![Host::new(&fleet, "p1"), Host::new(&fleet, "p2")];
    each_host(&mut hosts, |h| {
        converge_if(h, &fleet, "1", "nothing", false)
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9b15);
    let mut n = 1;
    let mut landed = 0;
    for _ in 0..18 {
        n += 1;
        let label = n.to_string();
        let t = Instant::now();
        fleet.publish(&label);
        // Kill the next publish within the time a whole one takes (measured just now).
        let publish_ms = (t.elapsed().as_millis() as u64 * 8 / 10).max(1);
        let next = format!("{label}p");
        fleet.write(&next);
        let runs: Vec<Child> = hosts
            .iter()
            .map(|h| {
                h.relay.reset();
                h.relay.throttle(1024 * 1024);
                h.spawn(&[])
            })
            .collect();
        // Publish the next version while the hosts are downloading this one; kill it.
        wait_until(Duration::from_secs(30), || {
            hosts.iter().all(|h| !h.relay.connections().is_empty())
        });
        let mut publish = crate::common::bento_std()
            .args(["publish", "--fleet"])
            .arg(fleet.sshd.fleet())
            .arg("--chroot")
            .arg(fleet.sshd.chroot())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..publish_ms)));
        let killed = kill_and_reap(&mut publish);
        landed += killed as usize;
        for (h, run) in hosts.iter_mut().zip(runs) {
            let out = wait_with_deadline(run, Duration::from_secs(120)).unwrap();
            fs::write(h.base().join("killed-run.log"), text(&out)).unwrap();
            h.account("a run during a killed publish").unwrap();
        }
        // Whatever `current` names now is complete; the hosts converge on it, then on
        // the next version once a publish completes.
        fleet.sshd.publish();
        each_host(&mut hosts, |h| {
            converge(h, &fleet, &next, "publish killed during a download")
        });
    }
    assert!(landed >= 6, "only {landed} publishes were killed mid-way");
}

/// One `bento agent update` in this process through the library API, with `now` as the
/// clock and `on_progress` seeing every step line.
fn update_in_process(
    h: &Host<'_>,
    now: &dyn Fn() -> SystemTime,
    on_progress: &dyn Fn(&str),
) -> Result<bento::agent::RunResult, bento::agent::AgentError> {
    let cfg = bento::agent::AgentConfig::load(&h.m.config()).unwrap();
    let host = bento::agent::host::NixHost::new(
        bento::nix::Nix::default()
            .with_env("NIX_CONFIG", crate::common::NIX_CONFIG)
            .with_env("BENTO_TEST_ACTIVATION_LOG", h.m.activation_log()),
        &cfg,
    );
    let ssh = cfg.ssh_options();
    let connect =
        |url: &bento::agent::source::ServerUrl, _| bento::agent::source::connect(url, &ssh);
    bento::agent::update(&bento::agent::UpdateOptions {
        config: &cfg,
        host: &host,
        connect: &connect,
        now,
        force: false,
        on_wait: &|| {},
        on_progress,
    })
}

/// The machine's clock jumps backwards, between runs and in the middle of a run (when the
/// build starts), by a second up to a year: every version still applies once, with one
/// report each, and the next run is a no-op.
#[test]
fn clock_jumps_backwards() {
    let fleet = Fleet::start(&["t1"], 1024);
    let mut h = Host::new(&fleet, "t1");
    let real = SystemTime::now;
    let out = update_in_process(&h, &real, &|_| {}).unwrap();
    assert_eq!(out.exit_code(), 10, "{out:?}");
    h.account("the first install").unwrap();
    h.check(&fleet, "1").unwrap();
    let mut n = 1;
    for back in [
        1,
        5,
        60,
        600,
        3600,
        86_400,
        7 * 86_400,
        30 * 86_400,
        365 * 86_400,
    ] {
        for mid_run in [false, true] {
            n += 1;
            let label = n.to_string();
            fleet.publish(&label);
            let jumped = Cell::new(!mid_run);
            let clock = || {
                let t = SystemTime::now();
                if jumped.get() {
                    t - Duration::from_secs(back)
                } else {
                    t
                }
            };
            let on_progress = |line: &str| {
                if line.starts_with("building") {
                    jumped.set(true);
                }
            };
            let result = update_in_process(&h, &clock, &on_progress);
            h.account("a run with the clock set back").unwrap();
            let fault = format!("the clock set back {back} s (mid-run: {mid_run})");
            let converged = matches!(&result, Ok(r) if r.exit_code() == 10)
                && h.check(&fleet, &label).is_ok()
                && update_in_process(&h, &clock, &|_| {}).is_ok_and(|r| r.exit_code() == 0);
            record(converged);
            assert!(
                converged,
                "{fault}: {result:?}: {:?}",
                h.check(&fleet, &label)
            );
        }
    }
}

/// A version that failed (here: its build) is retried after the back-off, 5 minutes for
/// the first failure. If the clock then goes back a day, `retry_at = last failure + 5 min`
/// lies a day ahead and the timer's runs skip the version for a day (for a year, a year).
#[test]
fn backoff_survives_a_clock_set_back() {
    let fleet = Fleet::start(&["b1"], 1024);
    let h = Host::new(&fleet, "b1");
    let t0 = SystemTime::now();
    update_in_process(&h, &|| t0, &|_| {}).unwrap();
    fs::write(
        fleet.sshd.fleet().join("hosts/b1/flake.nix"),
        "{ outputs = { self }: { nixosConfigurations.b1 = throw \"broken on purpose\"; }; }\n",
    )
    .unwrap();
    fleet.sshd.publish();
    let failed = update_in_process(&h, &|| t0, &|_| {}).unwrap();
    assert_eq!(failed.exit_code(), 11, "{failed:?}");
    // The clock goes back a day; the timer runs every 15 minutes for two hours.
    let back = t0 - Duration::from_secs(86_400);
    for i in 1..=8u64 {
        let at = back + Duration::from_secs(i * 15 * 60);
        let r = update_in_process(&h, &|| at, &|_| {}).unwrap();
        if r.exit_code() == 11 {
            return;
        }
    }
    panic!("the failed version was not retried within two hours of timer runs after the clock went back a day (5 min back-off)");
}
