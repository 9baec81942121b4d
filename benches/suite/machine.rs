//! One managed machine for the agent scenarios: its agent.toml, state dir, system profile,
//! files root and "current system" all inside the bench's scratch directory, so an agent
//! run never touches the real system. Classic hosts build the toy `<nixpkgs/nixos>`
//! stand-in from tests/fixtures (a plain derivation; activation appends to a log).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::proc::{self, Run};
use crate::server::{bento, Server};

pub const EXIT_NOOP: i32 = 0;
pub const EXIT_UPDATED: i32 = 10;

pub fn toy_nixpkgs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/toy/nixpkgs")
}

pub struct Machine {
    pub host: String,
    pub base: PathBuf,
}

impl Machine {
    /// A machine for `host` connecting to `port` (sshd's, or a relay's in front of it).
    pub fn new(server: &Server, host: &str, base: &Path, port: u16) -> Machine {
        fs::create_dir_all(base.join("root")).unwrap();
        let known_hosts = base.join("known_hosts");
        fs::write(&known_hosts, server.known_hosts_for(port)).unwrap();
        let text = format!(
            "host = \"{host}\"\n\
             server = \"sftp://{acct}@127.0.0.1:{port}\"\n\
             identity_file = \"{key}\"\n\
             known_hosts = \"{kh}\"\n\
             state_dir = \"{b}/state\"\n\
             profile = \"{b}/profiles/system\"\n\
             current_system = \"{b}/no-current-system\"\n\
             files_root = \"{b}/root\"\n\
             connect_timeout = \"10s\"\n\
             confirm_timeout = \"10s\"\n",
            acct = server.account(host),
            key = server.client_key(host).display(),
            kh = known_hosts.display(),
            b = base.display(),
        );
        fs::write(base.join("agent.toml"), text).unwrap();
        Machine {
            host: host.to_owned(),
            base: base.to_owned(),
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = bento();
        cmd.args(["agent", "update", "--config"])
            .arg(self.base.join("agent.toml"))
            .env("NIX_PATH", format!("nixpkgs={}", toy_nixpkgs().display()))
            .env(
                "BENTO_TEST_ACTIVATION_LOG",
                self.base.join("activations.log"),
            );
        cmd
    }

    /// One `bento agent update` (at most 120 s).
    pub fn update(&self) -> Run {
        proc::run(&mut self.command(), b"", Duration::from_secs(120))
    }

    /// An update that must exit with `code`.
    pub fn update_expect(&self, code: i32) -> Run {
        let r = self.update();
        assert_eq!(
            r.code(),
            code,
            "agent update of {}: {}",
            self.host,
            r.text()
        );
        r
    }
}

/// `sftp -b -` as `host` against `port`, with the same client settings the agent gives
/// OpenSSH (system ssh_config, default algorithms, strict host key, no multiplexing).
pub fn sftp(server: &Server, host: &str, port: u16, known_hosts: &Path, batch: &str) -> Run {
    let mut cmd = Command::new("sftp");
    cmd.args(["-b", "-", "-q", "-P"])
        .arg(port.to_string())
        .arg("-i")
        .arg(server.client_key(host))
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ControlMaster=no",
            "-o",
            "ControlPath=none",
            "-o",
            "ConnectTimeout=10",
            "-o",
        ])
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg(format!("{}@127.0.0.1", server.account(host)));
    proc::run(&mut cmd, batch.as_bytes(), Duration::from_secs(120))
}
