//! Enrolment end to end (issue #25): a new machine joins the fleet with only `bento agent
//! init`, `bento host add` (as root: its account too), `bento agent-config` and the agent
//! itself, over the real sshd and real Nix; `bento agent check` passes on it and names each
//! of five seeded mistakes in one line with its fix.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::agent::{code, text, EXIT_UPDATED};
use crate::common::sshd::{wait_with_deadline, Sshd};
use crate::common::{bento, bento_std, toy_nix_path};

fn run(mut cmd: Command) -> Output {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("run bento");
    wait_with_deadline(child, Duration::from_secs(120)).expect("bento finished within 120 s")
}

/// `bento agent check --config FILE`: its exit code and the FAIL lines.
fn check(config: &Path) -> (i32, Vec<String>, Output) {
    let mut cmd = bento_std();
    cmd.args(["agent", "check", "--config"]).arg(config);
    let out = run(cmd);
    let fails = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("FAIL"))
        .map(str::to_owned)
        .collect();
    (code(&out), fails, out)
}

struct NewMachine {
    dir: PathBuf,
}

impl NewMachine {
    fn key(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }
    fn config(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }
    fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }
}

#[test]
fn a_new_host_enrols_with_four_commands_and_agent_check_names_each_mistake() {
    let mut sshd = Sshd::start(&[]);
    // The account host add makes is pruned with the fleet when the test ends.
    sshd.hosts.push("alpha".to_owned());
    let fleet = sshd.fleet();
    let signing_key = sshd.dir.join("signing_key");
    bento()
        .args(["keygen", "-o"])
        .arg(&signing_key)
        .assert()
        .success();
    let toml = fleet.join("bento.toml");
    let mut settings = fs::read_to_string(&toml).unwrap();
    settings.push_str(&format!(
        "address = \"127.0.0.1\"\nport = {}\nhost_key = \"{}\"\nsigning_key = \"{}\"\n",
        sshd.port,
        sshd.dir.join("sshd/ssh_host_ed25519_key.pub").display(),
        signing_key.display()
    ));
    fs::write(&toml, settings).unwrap();

    // On the machine: its key, and the line for the server's admin.
    let m = NewMachine {
        dir: sshd.dir.join("machine-alpha"),
    };
    fs::create_dir_all(m.dir.join("root")).unwrap();
    let out = bento()
        .args([
            "agent",
            "init",
            "--server",
            "sftp://127.0.0.1",
            "--host",
            "alpha",
            "--identity-file",
        ])
        .arg(m.key())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let key = line
        .strip_prefix("bento host add alpha --key '")
        .and_then(|rest| rest.strip_suffix('\''))
        .unwrap_or_else(|| panic!("agent init printed {line:?}"));
    assert_eq!(
        fs::metadata(m.key()).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // On the server, as root: the host, its directory and its account.
    let out = bento()
        .args(["host", "add", "alpha", "--key", key, "--fleet"])
        .arg(&fleet)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&sshd.account("alpha")), "{said}");
    assert!(fleet.join("hosts/alpha/configuration.nix").is_file());
    // The toy stand-in for NixOS takes mkSystem's arguments, not a NixOS module.
    fs::write(
        fleet.join("hosts/alpha/configuration.nix"),
        "{ ... }: { hostName = \"alpha\"; version = \"1\"; }\n",
    )
    .unwrap();
    sshd.publish();

    // The settings, written exactly as printed; the test's machine keeps its state, profile
    // and files inside the test directory (paths only, nothing about the server).
    let out = bento()
        .args(["agent-config", "alpha", "--json", "--fleet"])
        .arg(&fleet)
        .arg("--identity-file")
        .arg(m.key())
        .arg("--known-hosts")
        .arg(m.known_hosts())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let agent_toml = printed["agent_toml"].as_str().unwrap().to_owned();
    let sandbox = format!(
        "state_dir = \"{d}/state\"\nprofile = \"{d}/profiles/system\"\ncurrent_system = \"{d}/no-current-system\"\nfiles_root = \"{d}/root\"\nconnect_timeout = \"5s\"\n",
        d = m.dir.display()
    );
    let write_config = |toml: &str| fs::write(m.config(), format!("{toml}{sandbox}")).unwrap();
    write_config(&agent_toml);
    let known_line = printed["known_hosts_line"].as_str().unwrap().to_owned();
    assert!(
        known_line.starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", sshd.port)),
        "{known_line}"
    );
    fs::write(m.known_hosts(), format!("{known_line}\n")).unwrap();

    let (status, fails, out) = check(&m.config());
    assert_eq!(status, 0, "{}", text(&out));
    assert!(fails.is_empty(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("signed by a key in trusted_keys"), "{said}");

    let mut cmd = bento_std();
    cmd.args(["agent", "update", "--config"])
        .arg(m.config())
        .env("NIX_PATH", toy_nix_path())
        .env("BENTO_TEST_ACTIVATION_LOG", m.dir.join("activations.log"));
    let out = run(cmd);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let activations = fs::read_to_string(m.dir.join("activations.log")).unwrap();
    assert!(
        activations.contains("nixos-system-alpha-1"),
        "{activations}"
    );

    // Five mistakes, one at a time: each is one FAIL line naming it and its fix.
    let other_key = {
        let k = sshd.dir.join("other_host_key");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&k)
            .status()
            .unwrap();
        assert!(st.success());
        let public = fs::read_to_string(k.with_extension("pub")).unwrap();
        public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let name = known_line.split_whitespace().next().unwrap().to_owned();
    let unreachable_line = known_line.replace("[127.0.0.1]", "[127.0.0.2]");
    type Seed<'a> = Box<dyn Fn() + 'a>;
    let seeded: Vec<(&str, Seed, String)> = vec![
        (
            "wrong server key",
            Box::new(|| {
                fs::write(m.known_hosts(), format!("{name} {other_key}\n")).unwrap();
            }),
            "host key is not the one in".to_owned(),
        ),
        (
            "wrong key permissions",
            Box::new(|| {
                fs::set_permissions(m.key(), fs::Permissions::from_mode(0o644)).unwrap();
            }),
            format!("chmod 600 {}", m.key().display()),
        ),
        (
            "missing trusted key",
            Box::new(|| {
                let without: String = agent_toml
                    .lines()
                    .filter(|l| !l.starts_with("trusted_keys"))
                    .map(|l| format!("{l}\n"))
                    .collect();
                write_config(&without);
            }),
            "trusted_keys is empty".to_owned(),
        ),
        (
            "unreachable server",
            Box::new(|| {
                write_config(&agent_toml.replace("@127.0.0.1:", "@127.0.0.2:"));
                fs::write(
                    m.known_hosts(),
                    format!("{known_line}\n{unreachable_line}\n"),
                )
                .unwrap();
            }),
            "cannot reach".to_owned(),
        ),
        (
            "wrong host name",
            Box::new(|| {
                write_config(&agent_toml.replace("host = \"alpha\"", "host = \"beta\""));
            }),
            "set host = \"alpha\"".to_owned(),
        ),
    ];
    for (mistake, seed, needle) in seeded {
        seed();
        let (status, fails, out) = check(&m.config());
        assert_eq!(status, 1, "{mistake}: {}", text(&out));
        assert_eq!(fails.len(), 1, "{mistake}: {}", text(&out));
        assert!(fails[0].contains(&needle), "{mistake}: {}", fails[0]);
        // Back to the settings as printed.
        write_config(&agent_toml);
        fs::write(m.known_hosts(), format!("{known_line}\n")).unwrap();
        fs::set_permissions(m.key(), fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (status, _, out) = check(&m.config());
    assert_eq!(status, 0, "{}", text(&out));
}

/// `--nixos` prints a block that is valid Nix inside a NixOS configuration.
#[test]
fn agent_config_nixos_block_parses() {
    if Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("nix-instantiate not installed: skipped");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let host_key = t.path().join("host_key.pub");
    fs::write(
        &host_key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHyvBNWS0tUTjrP3DxEx8bnhSwa7hvxOHgTSxBqYpMCy root@srv\n",
    )
    .unwrap();
    fs::write(
        t.path().join("bento.toml"),
        format!(
            "[server]\naddress = \"srv.example.org\"\nport = 2222\nhost_key = \"{}\"\n[hosts.alpha]\n",
            host_key.display()
        ),
    )
    .unwrap();
    let out = bento()
        .args(["agent-config", "alpha", "--nixos", "--fleet"])
        .arg(t.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let block = String::from_utf8_lossy(&out.stdout);
    assert!(
        block.contains("knownHosts = \"[srv.example.org]:2222 ssh-ed25519 "),
        "{block}"
    );
    let file = t.path().join("host.nix");
    fs::write(&file, format!("{{ config, ... }}: {{\n{block}\n}}\n")).unwrap();
    let out = Command::new("nix-instantiate")
        .arg("--parse")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}
