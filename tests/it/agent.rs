//! `bento agent update` end to end: the real sshd harness, real Nix builds of toy systems,
//! a system profile inside the test, and the toy `switch-to-configuration` recording every
//! activation.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bento::protocol::report::{Heartbeat, Outcome, Report};

use crate::common::relay::{Relay, Traffic};
use crate::common::sshd::{wait_with_deadline, Sshd};
use crate::common::{bento_std, TOY_LIB};

pub(crate) const EXIT_NOOP: i32 = 0;
pub(crate) const EXIT_UPDATED: i32 = 10;
pub(crate) const EXIT_FAILED: i32 = 11;
pub(crate) const EXIT_ROLLED_BACK: i32 = 12;

/// The toy `<nixpkgs/nixos>` stand-in for classic hosts.
fn toy_nixpkgs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/toy/nixpkgs")
}

/// One managed machine: its agent.toml, state, profile and files root, all in the test dir.
pub(crate) struct Machine<'a> {
    pub(crate) sshd: &'a Sshd,
    pub(crate) host: String,
    pub(crate) base: PathBuf,
    /// The port the agent connects to (sshd's, or a relay's in front of it).
    port: u16,
}

impl<'a> Machine<'a> {
    pub(crate) fn new(sshd: &'a Sshd, host: &str, extra_config: &str) -> Self {
        let base = sshd.dir.join(format!("machine-{host}"));
        fs::create_dir_all(base.join("root")).unwrap();
        let m = Machine {
            sshd,
            host: host.to_owned(),
            base,
            port: sshd.port,
        };
        m.write_config(extra_config);
        m
    }

    /// Connects through `port` (a relay) instead of straight to sshd.
    pub(crate) fn via(mut self, port: u16) -> Self {
        self.port = port;
        let line = fs::read_to_string(self.sshd.known_hosts()).unwrap();
        let key = line.split_once(' ').unwrap().1;
        fs::write(
            self.known_hosts(),
            format!("{line}[127.0.0.1]:{port} {key}"),
        )
        .unwrap();
        self.write_config("");
        self
    }

    pub(crate) fn write_config(&self, extra: &str) {
        let text = format!(
            "host = \"{host}\"\nserver = \"sftp://{acct}@127.0.0.1:{port}\"\nidentity_file = \"{key}\"\nknown_hosts = \"{kh}\"\nstate_dir = \"{base}/state\"\nprofile = \"{base}/profiles/system\"\ncurrent_system = \"{base}/no-current-system\"\nfiles_root = \"{base}/root\"\nconnect_timeout = \"5s\"\nconfirm_timeout = \"3s\"\n{extra}",
            host = self.host,
            acct = self.sshd.account(&self.host),
            port = self.port,
            key = self.sshd.client_key(&self.host).display(),
            kh = self.known_hosts().display(),
            base = self.base.display(),
        );
        fs::write(self.config(), text).unwrap();
        if !self.known_hosts().exists() {
            fs::copy(self.sshd.known_hosts(), self.known_hosts()).unwrap();
        }
    }

    pub(crate) fn config(&self) -> PathBuf {
        self.base.join("agent.toml")
    }

    /// The machine's own copy of known_hosts (a test may break it).
    pub(crate) fn known_hosts(&self) -> PathBuf {
        self.base.join("known_hosts")
    }

    pub(crate) fn activation_log(&self) -> PathBuf {
        self.base.join("activations.log")
    }

    pub(crate) fn activations(&self) -> Vec<String> {
        fs::read_to_string(self.activation_log())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub(crate) fn command(&self, extra_env: &[(&str, &str)]) -> Command {
        let mut cmd = bento_std();
        cmd.args(["agent", "update", "--config"])
            .arg(self.config())
            .env("NIX_PATH", format!("nixpkgs={}", toy_nixpkgs().display()))
            .env("BENTO_TEST_ACTIVATION_LOG", self.activation_log())
            .env("BENTO_LOG", "bento=debug")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `bento agent update` (bounded) and returns its output.
    pub(crate) fn update_with(&self, extra_env: &[(&str, &str)], args: &[&str]) -> Output {
        let mut cmd = self.command(extra_env);
        cmd.args(args);
        let child = cmd.spawn().expect("run bento agent update");
        wait_with_deadline(child, Duration::from_secs(120))
            .expect("agent update finished within 120 s")
    }

    pub(crate) fn update(&self) -> Output {
        self.update_with(&[], &[])
    }

    pub(crate) fn profile_target(&self) -> Option<String> {
        fs::canonicalize(self.base.join("profiles/system"))
            .ok()
            .map(|p| p.display().to_string())
    }

    pub(crate) fn logs(&self) -> PathBuf {
        self.sshd.host_dir(&self.host).join("logs")
    }

    /// The reports this machine has spooled (not yet delivered), as text.
    pub(crate) fn spooled(&self) -> Vec<String> {
        json_texts(&self.base.join("state/spool"))
    }

    /// The reports the server has received from this machine, as text.
    pub(crate) fn delivered(&self) -> Vec<String> {
        json_texts(&self.logs().join("reports"))
    }

    pub(crate) fn latest_report(&self) -> Report {
        Report::parse(&fs::read(self.logs().join("latest.json")).expect("latest.json delivered"))
            .unwrap()
    }

    pub(crate) fn heartbeat(&self) -> Heartbeat {
        Heartbeat::parse(&fs::read(self.logs().join("heartbeat.json")).expect("heartbeat written"))
            .unwrap()
    }

    pub(crate) fn state(&self) -> serde_json::Value {
        serde_json::from_slice(&fs::read(self.base.join("state/state.json")).unwrap()).unwrap()
    }
}

pub(crate) fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

pub(crate) fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A fleet of toy hosts served by a fresh sshd: `alpha` a flake host, `classic` a classic
/// one, both importing common/ (toy lib + version) and each with a secret under files/.
pub(crate) fn fleet(sshd: &Sshd) {
    let f = sshd.fleet();
    fs::create_dir_all(f.join("common")).unwrap();
    fs::write(f.join("common/lib.nix"), TOY_LIB).unwrap();
    write_version(sshd, "1");
    for h in &sshd.hosts {
        let dir = f.join("hosts").join(h);
        let _ = std::os::unix::fs::symlink("../../common", dir.join("common"));
        if h == "classic" {
            fs::write(
                dir.join("configuration.nix"),
                "{ ... }: { hostName = \"classic\"; version = (import ./common/version.nix).version; }\n",
            )
            .unwrap();
        } else {
            let _ = fs::remove_file(dir.join("configuration.nix"));
            fs::create_dir_all(dir.join("files").join(h)).unwrap();
            // In a flake directory each host's files live under files/<host>/.
            if dir.join("files/etc").exists() {
                fs::rename(dir.join("files/etc"), dir.join("files").join(h).join("etc")).unwrap();
            }
            fs::write(
                dir.join("files.toml"),
                format!("[\"{h}/etc/bento-it/secret\"]\nmode = \"0640\"\ngroup = \"daemon\"\n"),
            )
            .unwrap();
            fs::write(dir.join("flake.nix"), flake_for(h)).unwrap();
            fs::write(dir.join("payload.txt"), "payload\n").unwrap();
        }
    }
    sshd.publish();
}

fn flake_for(host: &str) -> String {
    format!(
        r#"{{
  outputs = {{ self }}:
    let
      lib = import ./common/lib.nix;
      v = import ./common/version.nix;
    in {{
      nixosConfigurations.{host}.config.system.build.toplevel = lib.mkSystem {{
        hostName = "{host}";
        inherit (v) version;
        kernelVersion = v.kernel or "6.1.0";
        payload = builtins.readFile ./payload.txt;
      }};
    }};
}}
"#
    )
}

pub(crate) fn write_version(sshd: &Sshd, v: &str) {
    fs::write(
        sshd.fleet().join("common/version.nix"),
        format!("{{ version = \"{v}\"; }}\n"),
    )
    .unwrap();
}

#[test]
fn first_install_then_noop_then_one_changed_file() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    // A secret no other test writes, so finding it in the store means this run leaked it.
    let secret_text = format!("secret of alpha {}\n", sshd.prefix);
    fs::write(
        sshd.fleet()
            .join("hosts/alpha/files/alpha/etc/bento-it/secret"),
        &secret_text,
    )
    .unwrap();
    sshd.publish();
    let m = Machine::new(&sshd, "alpha", "");

    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let system = m.profile_target().expect("profile points at the build");
    assert!(system.contains("nixos-system-alpha-1"), "{system}");
    assert_eq!(m.activations(), [format!("switch {system}")]);
    let report = m.latest_report();
    assert_eq!(report.outcome, Outcome::Success);
    assert_eq!(report.system_after.as_deref(), Some(system.as_str()));
    assert!(
        m.logs().join(report.log_file_name()).is_file(),
        "full log delivered"
    );
    let hb = m.heartbeat();
    assert_eq!(hb.system.as_deref(), Some(system.as_str()));
    assert_eq!(hb.version, Some(report.version));

    // The secret: installed with its owner and mode, and in no store path.
    let secret = m.base.join("root/etc/bento-it/secret");
    assert_eq!(fs::read_to_string(&secret).unwrap(), secret_text);
    let meta = fs::metadata(&secret).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!(
        meta.gid(),
        bento::sys::accounts::group("daemon").unwrap().unwrap()
    );
    let grep = Command::new("grep")
        .args(["-rlF", secret_text.trim_end(), "/nix/store"])
        .output()
        .unwrap();
    assert!(
        grep.stdout.is_empty(),
        "secret found in the store: {}",
        String::from_utf8_lossy(&grep.stdout)
    );

    // No change: one connection, `current` read, the heartbeat written: within a small
    // margin of a bare SFTP connect-and-quit (the floor).
    let relay = Relay::start(sshd.port);
    let m = m.via(relay.port);
    let floor = bare_sftp_session(&sshd, &m, relay.port);
    relay.reset();
    let out = m.update();
    assert_eq!(code(&out), EXIT_NOOP, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("up to date"),
        "{}",
        text(&out)
    );
    assert_eq!(m.activations().len(), 1);
    let conns = relay.connections();
    assert_eq!(conns.len(), 1, "a no-op costs one connection: {conns:?}");
    let heartbeat_len = fs::metadata(m.logs().join("heartbeat.json")).unwrap().len();
    assert!(
        conns[0].total() <= floor.total() + 65 + heartbeat_len + 1024,
        "no-op moved {:?}; a bare session moves {floor:?}",
        conns[0]
    );

    // One file of many changes: that object and the manifest cross the wire, little else.
    for i in 0..40 {
        fs::write(
            sshd.fleet().join(format!("hosts/alpha/extra-{i}.nix")),
            format!("# {i}\n{}\n", "x".repeat(4000)),
        )
        .unwrap();
    }
    sshd.publish();
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    // payload.txt goes into the system, so this also activates and confirms.
    fs::write(
        sshd.fleet().join("hosts/alpha/payload.txt"),
        "payload, changed\n",
    )
    .unwrap();
    sshd.publish();
    let host_dir = sshd.host_dir("alpha");
    let live = bento::protocol::layout::parse_current(
        &fs::read_to_string(host_dir.join("current")).unwrap(),
    )
    .unwrap();
    let manifest_len = fs::metadata(bento::protocol::layout::manifest(&host_dir, &live))
        .unwrap()
        .len();
    relay.reset();
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fetching 1 of"),
        "{}",
        text(&out)
    );
    let conns = relay.connections();
    assert_eq!(
        conns.len(),
        2,
        "one connection for the update, a fresh one to confirm: {conns:?}"
    );
    let budget = floor.down + manifest_len + 64 + 8 * 1024;
    assert!(
        conns[0].down <= budget,
        "downloaded {} bytes, budget {budget}",
        conns[0].down
    );
    assert!(
        conns[0].down < 40 * 4000,
        "far less than the configuration itself"
    );
    assert!(m.profile_target().unwrap() != system);
}

/// Bytes of a bare `sftp` connect-and-quit as `m`'s host through `port`.
fn bare_sftp_session(sshd: &Sshd, m: &Machine<'_>, port: u16) -> Traffic {
    let relay_before = Relay::start(port);
    let mut cmd = Command::new("sftp");
    cmd.args(["-b", "-", "-o"])
        .arg(format!("Port={}", relay_before.port))
        .arg("-o")
        .arg(format!("User={}", sshd.account(&m.host)))
        .arg("-o")
        .arg(format!(
            "IdentityFile={}",
            sshd.client_key(&m.host).display()
        ))
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
        ])
        .arg(format!("UserKnownHostsFile={}", m.known_hosts().display()))
        .arg("-o")
        .arg(format!("HostKeyAlias=[127.0.0.1]:{}", sshd.port))
        .arg("127.0.0.1");
    let out = crate::common::sshd::run_with_input(cmd, "bye\n", Duration::from_secs(30));
    assert!(
        out.status.success(),
        "sftp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conns = relay_before.connections();
    assert_eq!(conns.len(), 1);
    conns[0]
}

#[test]
fn build_failure_keeps_the_system_and_backs_off() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    let before = m.profile_target().unwrap();

    fs::write(
        sshd.fleet().join("hosts/alpha/flake.nix"),
        "{ outputs = { self }: { nixosConfigurations.alpha = throw \"broken on purpose\"; }; }\n",
    )
    .unwrap();
    sshd.publish();
    let out = m.update();
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    assert_eq!(m.profile_target().unwrap(), before, "profile untouched");
    assert_eq!(m.activations().len(), 1, "nothing activated");
    let report = m.latest_report();
    assert_eq!(report.outcome, Outcome::Failure);
    assert!(
        report.error.as_deref().unwrap().contains("build failed"),
        "{report:?}"
    );
    assert!(
        report.log_tail.contains("broken on purpose"),
        "{}",
        report.log_tail
    );
    assert_eq!(report.system_after.as_deref(), Some(before.as_str()));

    // Not retried in a loop.
    let out = m.update();
    assert_eq!(code(&out), EXIT_NOOP, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("retrying in"),
        "{}",
        text(&out)
    );
    // A forced retry tries again (and fails again).
    assert_eq!(code(&m.update_with(&[], &["--force"])), EXIT_FAILED);
}

/// Issue #12: the host's own build error names the file and line in its configuration
/// tree, not the staged copy or the `/nix/store/…-source` copy Nix read.
#[test]
fn a_build_error_names_the_file_and_line_of_the_configuration() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    // The flake still lists its host (publish needs that); the file it imports does not parse.
    fs::write(
        sshd.fleet().join("hosts/alpha/flake.nix"),
        "{ outputs = { self }: { nixosConfigurations.alpha = import ./broken.nix; }; }\n",
    )
    .unwrap();
    fs::write(
        sshd.fleet().join("hosts/alpha/broken.nix"),
        "{\n  config = ;\n}\n",
    )
    .unwrap();
    sshd.publish();
    let out = m.update();
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let error = m.latest_report().error.unwrap();
    assert!(error.contains("syntax error"), "{error}");
    assert!(error.contains("(at broken.nix:2:"), "{error}");
    assert!(!error.contains("/nix/store"), "{error}");
    assert!(!error.contains("/var/lib"), "{error}");
}

#[test]
fn activation_failure_restores_the_previous_system() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    let before = m.profile_target().unwrap();

    write_version(&sshd, "2");
    sshd.publish();
    let out = m.update_with(&[("BENTO_TEST_FAIL_ACTIVATION", "1")], &[]);
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    assert_eq!(
        m.profile_target().unwrap(),
        before,
        "profile back on the previous system"
    );
    let acts = m.activations();
    assert!(acts[1].contains("nixos-system-alpha-2"), "{acts:?}");
    assert_eq!(
        acts.last().unwrap(),
        &format!("switch {before}"),
        "previous system re-activated"
    );
    let report = m.latest_report();
    assert_eq!(report.outcome, Outcome::Failure);
    assert!(report.error.unwrap().contains("activation failed"));
}

#[test]
fn losing_the_server_after_activation_rolls_back_and_reports_later() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    let before = m.profile_target().unwrap();

    // Version 2's activation breaks the machine's way to the server: its known_hosts.
    write_version(&sshd, "2");
    fs::write(
        sshd.fleet()
            .join("hosts/alpha/files/alpha/etc/bento-it/secret"),
        "secret of alpha, version 2\n",
    )
    .unwrap();
    sshd.publish();
    let hook = m.base.join("hook.sh");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\ncase \"$2\" in *-alpha-2) echo '[127.0.0.1]:{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBadBadBadBadBadBadBadBadBadBadBadBadBadBadBad' > {} ;; esac\n",
            sshd.port,
            m.known_hosts().display()
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let good_known_hosts = fs::read(sshd.known_hosts()).unwrap();
    let out = m.update_with(&[("BENTO_TEST_HOOK", hook.to_str().unwrap())], &[]);
    assert_eq!(code(&out), EXIT_ROLLED_BACK, "{}", text(&out));
    assert_eq!(
        m.profile_target().unwrap(),
        before,
        "back on the exact previous system"
    );
    assert_eq!(
        fs::read_to_string(m.base.join("root/etc/bento-it/secret")).unwrap(),
        "secret of alpha\n",
        "the previous version's files are back too"
    );
    let acts = m.activations();
    assert_eq!(acts.len(), 3, "{acts:?}");
    assert!(acts[1].contains("-alpha-2"));
    assert_eq!(acts[2], format!("switch {before}"));
    // The report could not be delivered yet.
    assert_eq!(m.latest_report().outcome, Outcome::Success);

    // The network comes back: the next run delivers the rollback report and does not retry.
    fs::write(m.known_hosts(), good_known_hosts).unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_NOOP, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rolled back"),
        "{}",
        text(&out)
    );
    let report = m.latest_report();
    assert_eq!(report.outcome, Outcome::Rollback);
    assert_eq!(report.system_after.as_deref(), Some(before.as_str()));
    let reports = fs::read_dir(m.logs().join("reports")).unwrap().count();
    assert_eq!(
        reports, 4,
        "two runs, a report and a log each: delivered once"
    );
    assert!(
        fs::read_dir(m.base.join("state/spool"))
            .unwrap()
            .next()
            .is_none(),
        "spool emptied"
    );
    assert_eq!(m.activations().len(), 3);
}

#[test]
fn an_interrupted_download_resumes_and_nothing_partial_is_used() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    // A large file so the download takes a moment.
    let big: Vec<u8> = (0..24 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(sshd.fleet().join("hosts/alpha/big.bin"), &big).unwrap();
    sshd.publish();
    let m = Machine::new(&sshd, "alpha", "");

    let mut child = m.command(&[]).spawn().unwrap();
    let partial_seen = wait_for(Duration::from_secs(60), || {
        fs::read_dir(m.base.join("state/objects"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()).any(|e| {
                    e.file_name().to_string_lossy().starts_with(".partial-")
                        && e.metadata().map(|md| md.len() > 0).unwrap_or(false)
                })
            })
            .unwrap_or(false)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(partial_seen, "the download was never in progress");
    assert!(
        m.activations().is_empty(),
        "nothing built or activated from a partial download"
    );
    assert!(m.profile_target().is_none());

    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let staged = m.base.join("state/config/current/big.bin");
    assert_eq!(
        fs::read(staged).unwrap(),
        big,
        "complete and correct after resuming"
    );
}

#[test]
fn hostile_manifests_are_refused_before_anything_is_written() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    let host_dir = sshd.host_dir("alpha");
    let live = bento::protocol::layout::parse_current(
        &fs::read_to_string(host_dir.join("current")).unwrap(),
    )
    .unwrap();
    let good = fs::read_to_string(bento::protocol::layout::manifest(&host_dir, &live)).unwrap();

    // A manifest whose path climbs out of its tree, correctly named by its digest.
    let evil = good.replacen(
        "\"path\":\"flake.nix\"",
        "\"path\":\"../../../../etc/evil\"",
        1,
    );
    assert_ne!(evil, good);
    let digest = bento::protocol::manifest::Digest::of(evil.as_bytes());
    fs::write(bento::protocol::layout::manifest(&host_dir, &digest), &evil).unwrap();
    fs::write(
        host_dir.join("current"),
        bento::protocol::layout::current_text(&digest),
    )
    .unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let report = m.latest_report();
    assert!(
        report.error.as_deref().unwrap().contains("unsafe"),
        "{report:?}"
    );

    // A manifest that does not hash to the name `current` gives.
    let wrong = bento::protocol::manifest::Digest::of(b"something else");
    fs::write(bento::protocol::layout::manifest(&host_dir, &wrong), &good).unwrap();
    fs::write(
        host_dir.join("current"),
        bento::protocol::layout::current_text(&wrong),
    )
    .unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    assert!(m.latest_report().error.unwrap().contains("digest mismatch"));

    assert!(m.activations().is_empty());
    assert!(m.profile_target().is_none());
    assert!(!m.base.join("root/etc").exists(), "no file installed");
    assert!(!Path::new("/etc/evil").exists());
    assert!(
        !m.base.join("state/config/current").exists(),
        "no configuration staged"
    );
}

#[test]
fn concurrent_runs_never_overlap() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    let a = m.command(&[]).spawn().unwrap();
    let b = m.command(&[]).spawn().unwrap();
    let a = wait_with_deadline(a, Duration::from_secs(120)).unwrap();
    let b = wait_with_deadline(b, Duration::from_secs(120)).unwrap();
    let mut codes = [code(&a), code(&b)];
    codes.sort();
    assert_eq!(
        codes,
        [EXIT_NOOP, EXIT_UPDATED],
        "{}\n{}",
        text(&a),
        text(&b)
    );
    assert_eq!(m.activations().len(), 1, "exactly one activation");
}

#[test]
fn a_classic_host_is_built_from_configuration_nix() {
    let sshd = Sshd::start(&["classic"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "classic", "");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(m
        .profile_target()
        .unwrap()
        .contains("nixos-system-classic-1"));
    assert_eq!(
        fs::read_to_string(m.base.join("root/etc/bento-it/secret")).unwrap(),
        "secret of classic\n"
    );
    assert_eq!(
        m.state()["applied"]["system"].as_str(),
        m.profile_target().as_deref()
    );
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn a_file_dropped_from_the_fleet_is_removed_from_the_machine() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    let secret = m.base.join("root/etc/bento-it/secret");
    assert!(secret.is_file());

    // Version 2 adds a second file; version 3 drops both.
    let extra = sshd
        .fleet()
        .join("hosts/alpha/files/alpha/etc/bento-it/extra");
    fs::write(&extra, "extra\n").unwrap();
    write_version(&sshd, "2");
    sshd.publish();
    assert_eq!(code(&m.update()), EXIT_UPDATED);
    assert!(m.base.join("root/etc/bento-it/extra").is_file());

    fs::remove_dir_all(sshd.fleet().join("hosts/alpha/files")).unwrap();
    fs::remove_file(sshd.fleet().join("hosts/alpha/files.toml")).unwrap();
    write_version(&sshd, "3");
    sshd.publish();
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(
        !secret.exists(),
        "the dropped secret is still on the machine"
    );
    assert!(!m.base.join("root/etc/bento-it/extra").exists());
}

#[test]
fn agent_status_shows_the_local_view() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", "");
    let status = |json: bool| {
        let mut cmd = crate::common::bento();
        cmd.args(["agent", "status", "--config"]).arg(m.config());
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(status(false).contains("nothing yet"), "{}", status(false));

    assert_eq!(code(&m.update()), EXIT_UPDATED);
    let v: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    let live = bento::protocol::layout::parse_current(
        &fs::read_to_string(sshd.host_dir("alpha").join("current")).unwrap(),
    )
    .unwrap();
    assert_eq!(v["applied_version"], live.to_hex());
    assert_eq!(v["running_system"].as_str(), m.profile_target().as_deref());
    assert_eq!(v["applied_system"], v["running_system"]);
    assert_eq!(v["last_outcome"], "success");
    let text = status(false);
    assert!(
        text.contains(&format!("success of version {}", live.short())),
        "{text}"
    );
}

/// The `.json` files of `dir` as text (none when `dir` does not exist).
fn json_texts(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .map(|e| fs::read_to_string(e.path()).unwrap())
                .collect()
        })
        .unwrap_or_default()
}
