//! A private OpenSSH sshd for tests: on 127.0.0.1 at a free port, with its own host key,
//! `known_hosts` and client keys, configured with exactly what `bento server sshd-config`
//! prints, and host accounts made by `bento server sync-accounts` under a per-test account
//! prefix and group (`[server] group`, so concurrent tests never touch each other's
//! accounts, and no test's group holds another test's fleet). Dropping it stops sshd by its
//! pid and removes the accounts, the group, its PAM limits file and every file it made.

#![allow(dead_code)]

use std::fs;
use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{bento, is_root, unique_prefix, ScratchDir};

pub const SSHD: &str = "/usr/sbin/sshd";

/// A running test sshd and the fleet it serves.
pub struct Sshd {
    /// Root-owned 0755 base dir under /var/lib/bento-it (sshd refuses chroots and key
    /// files below group- or world-writable directories such as /tmp).
    pub dir: ScratchDir,
    pub port: u16,
    pub prefix: String,
    /// This test's `[server] group`: the prefix without its `-` (`btabcd`).
    pub group: String,
    pub hosts: Vec<String>,
    child: Option<Child>,
}

/// The per-test group of a fleet whose prefix is `prefix` (`btabcd-` gives `btabcd`).
pub fn group_of(prefix: &str) -> String {
    prefix.trim_end_matches('-').to_owned()
}

/// Removes a test's group and the PAM limits file sync-accounts wrote for it.
pub fn remove_group(group: &str) {
    let _ = fs::remove_file(bento::server::provision::limits_file(group));
    if bento::sys::accounts::group(group).ok().flatten().is_some() {
        let _ = Command::new("groupdel").arg(group).status();
    }
}

fn mkdir(path: &Path, mode: u32) {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A port nobody listens on right now (sshd may still lose a race for it: `start` retries).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

impl Sshd {
    /// Starts sshd for `hosts`, each with a fresh ed25519 key, accounts synced and a
    /// `hosts/<h>/configuration.nix` plus one secret under `files/` in the fleet repo.
    pub fn start(hosts: &[&str]) -> Sshd {
        assert!(
            is_root(),
            "the sshd tests need root (they create accounts and run sshd): run them as root, e.g. through the project's test script"
        );
        assert!(
            Path::new(SSHD).is_file(),
            "{SSHD} is missing: install Debian's openssh-server (the project's test script does)"
        );
        // sshd's privilege-separation directory; absent when no system sshd ever ran.
        mkdir(Path::new("/run/sshd"), 0o755);

        let dir = ScratchDir::new();
        let prefix = unique_prefix();
        let mut sshd = Sshd {
            dir,
            port: 0,
            group: group_of(&prefix),
            prefix,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            child: None,
        };
        mkdir(&sshd.dir.join("client"), 0o700);
        mkdir(&sshd.dir.join("sshd"), 0o700);
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "bento-it-sshd", "-f"])
                .arg(sshd.host_key()),
        );
        for h in hosts {
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C"])
                    .arg(format!("{h}@bento-it"))
                    .arg("-f")
                    .arg(sshd.client_key(h)),
            );
            sshd.write_host_config(h);
        }
        let with_keys: Vec<(String, Option<String>)> = hosts
            .iter()
            .map(|h| (h.to_string(), Some(sshd.public_key(h))))
            .collect();
        sshd.write_toml(&with_keys);
        sshd.sync_accounts(false);

        let mut last_error = String::new();
        for _ in 0..5 {
            sshd.port = free_port();
            sshd.write_sshd_config();
            match sshd.spawn() {
                Ok(child) => {
                    sshd.child = Some(child);
                    break;
                }
                Err(e) => last_error = e,
            }
        }
        assert!(sshd.child.is_some(), "sshd did not start: {last_error}");
        fs::write(
            sshd.known_hosts(),
            format!(
                "[127.0.0.1]:{} {}\n",
                sshd.port,
                fs::read_to_string(sshd.host_key().with_extension("pub"))
                    .unwrap()
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        )
        .unwrap();
        sshd
    }

    pub fn fleet(&self) -> PathBuf {
        self.dir.join("fleet")
    }
    pub fn chroot(&self) -> PathBuf {
        self.dir.join("chroot")
    }
    pub fn host_dir(&self, host: &str) -> PathBuf {
        self.chroot().join(host)
    }
    pub fn keys_dir(&self) -> PathBuf {
        self.dir.join("authorized_keys")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("sshd/sshd_config")
    }
    fn host_key(&self) -> PathBuf {
        self.dir.join("sshd/ssh_host_ed25519_key")
    }
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("sshd/sshd.log")
    }
    /// What sshd logged so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
    pub fn account(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }
    pub fn client_key(&self, host: &str) -> PathBuf {
        self.dir.join("client").join(host)
    }
    pub fn public_key(&self, host: &str) -> String {
        fs::read_to_string(self.client_key(host).with_extension("pub"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn write_host_config(&self, host: &str) {
        let h = self.fleet().join("hosts").join(host);
        fs::create_dir_all(h.join("files/etc/bento-it")).unwrap();
        fs::write(
            h.join("configuration.nix"),
            format!("{{ ... }}: {{ hostName = \"{host}\"; }}\n"),
        )
        .unwrap();
        fs::write(
            h.join("files/etc/bento-it/secret"),
            format!("secret of {host}\n"),
        )
        .unwrap();
        fs::write(
            h.join("files.toml"),
            "[\"etc/bento-it/secret\"]\nmode = \"0600\"\n",
        )
        .unwrap();
    }

    /// Rewrites bento.toml with these hosts and keys (the server paths stay this test's).
    pub fn write_toml(&self, hosts: &[(String, Option<String>)]) {
        let mut text = format!(
            "[server]\nchroot = \"{}\"\nauthorized_keys_dir = \"{}\"\naccount_prefix = \"{}\"\ngroup = \"{}\"\n",
            self.chroot().display(),
            self.keys_dir().display(),
            self.prefix,
            self.group
        );
        for (host, key) in hosts {
            text.push_str(&format!("\n[hosts.{host}]\n"));
            if let Some(key) = key {
                text.push_str(&format!("key = \"{key}\"\n"));
            }
        }
        fs::create_dir_all(self.fleet()).unwrap();
        fs::write(self.fleet().join("bento.toml"), text).unwrap();
    }

    /// `bento server sync-accounts [--prune]` on this fleet; panics on failure.
    pub fn sync_accounts(&self, prune: bool) -> String {
        let mut cmd = bento();
        cmd.args(["server", "sync-accounts", "--fleet"])
            .arg(self.fleet());
        if prune {
            cmd.arg("--prune");
        }
        let out = cmd.output().expect("run bento");
        assert!(
            out.status.success(),
            "bento server sync-accounts failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `bento publish` of the fleet into this sshd's chroot; panics on failure.
    pub fn publish(&self) {
        // Agent tests publish broken configurations on purpose: no evaluation gate here
        // (tests/it/delivery.rs tests the gate).
        let out = bento()
            .args(["publish", "--no-eval", "--fleet"])
            .arg(self.fleet())
            .arg("--chroot")
            .arg(self.chroot())
            .output()
            .expect("run bento");
        assert!(
            out.status.success(),
            "bento publish failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn write_sshd_config(&self) {
        let block = bento()
            .args(["server", "sshd-config", "--fleet"])
            .arg(self.fleet())
            .output()
            .expect("run bento");
        assert!(
            block.status.success(),
            "bento server sshd-config failed: {}",
            String::from_utf8_lossy(&block.stderr)
        );
        let text = format!(
            "# bento integration test sshd: loopback only, public keys only\n\
             ListenAddress 127.0.0.1\n\
             Port {port}\n\
             HostKey {key}\n\
             PidFile none\n\
             LogLevel VERBOSE\n\
             StrictModes yes\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin no\n\
             UsePAM no\n\
             AllowGroups {group}\n\
             # Only the bento Match block grants keys.\n\
             AuthorizedKeysFile none\n\
             Subsystem sftp internal-sftp\n\
             {block}",
            port = self.port,
            group = self.group,
            key = self.host_key().display(),
            block = String::from_utf8_lossy(&block.stdout),
        );
        fs::write(self.config(), text).unwrap();
        run_ok(Command::new(SSHD).arg("-t").arg("-f").arg(self.config()));
    }

    /// Stops sshd and starts it again on the same port from `config()` as it is now (a test
    /// that rewrote it, e.g. to serve a second fleet); waits until it greets.
    pub fn restart(&mut self) {
        self.stop();
        run_ok(Command::new(SSHD).arg("-t").arg("-f").arg(self.config()));
        let child = self
            .spawn()
            .unwrap_or_else(|e| panic!("sshd did not restart: {e}"));
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM by pid: sshd closes its listener; sessions already ended with the test.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            wait_or_kill(&mut child, Duration::from_secs(5));
        }
    }

    /// Starts sshd and waits (bounded) until it greets on its port.
    fn spawn(&self) -> Result<Child, String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.config())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {SSHD}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("sshd exited ({status}):\n{}", self.log()));
            }
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                let mut banner = [0u8; 8];
                if stream.read_exact(&mut banner).is_ok() && &banner == b"SSH-2.0-" {
                    return Ok(child);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!(
            "sshd did not accept connections within 10 s:\n{}",
            self.log()
        ))
    }

    /// Client options for `host`: this sshd only, strict host key, no multiplexing.
    pub fn client_opts(&self, host: &str) -> Vec<String> {
        let mut opts = vec!["-F".to_owned(), "/dev/null".to_owned()];
        for o in [
            format!("Port={}", self.port),
            format!("User={}", self.account(host)),
            format!("IdentityFile={}", self.client_key(host).display()),
            "IdentitiesOnly=yes".to_owned(),
            format!("UserKnownHostsFile={}", self.known_hosts().display()),
            "GlobalKnownHostsFile=/dev/null".to_owned(),
            "StrictHostKeyChecking=yes".to_owned(),
            "BatchMode=yes".to_owned(),
            "ControlMaster=no".to_owned(),
            "ControlPath=none".to_owned(),
            // Faster than the default post-quantum KEX, which matters for the login storms.
            "KexAlgorithms=curve25519-sha256".to_owned(),
            "ConnectTimeout=10".to_owned(),
            "ServerAliveInterval=5".to_owned(),
            "ServerAliveCountMax=2".to_owned(),
            "LogLevel=ERROR".to_owned(),
        ] {
            opts.push("-o".to_owned());
            opts.push(o);
        }
        opts
    }

    /// `sftp -b -` as `host` with `batch` on stdin. Note: sftp -b exits 0 even when an `ls`
    /// fails; judge `ls` by its output.
    pub fn sftp(&self, host: &str, batch: &str) -> Output {
        let mut cmd = Command::new("sftp");
        cmd.args(["-b", "-"])
            .args(self.client_opts(host))
            .arg("127.0.0.1");
        run_with_input(cmd, batch, Duration::from_secs(60))
    }

    /// An `ssh` command as `host` (add the remote command or options yourself).
    pub fn ssh(&self, host: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(self.client_opts(host));
        cmd
    }
}

/// Runs `cmd` with `input` on stdin and a deadline; a command still running at the
/// deadline is killed and the test fails.
pub fn run_with_input(mut cmd: Command, input: &str, timeout: Duration) -> Output {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = wait_with_deadline(child, timeout)
        .unwrap_or_else(|| panic!("{cmd:?} still running after {timeout:?}"));
    let _ = writer.join();
    out
}

/// Waits for `child`'s output; kills it and returns `None` at the deadline.
pub fn wait_with_deadline(mut child: Child, timeout: Duration) -> Option<Output> {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let read_out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let read_err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let status = wait_or_kill(&mut child, timeout);
    let stdout = read_out.join().unwrap();
    let stderr = read_err.join().unwrap();
    status.map(|status| Output {
        status,
        stdout,
        stderr,
    })
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
        // The accounts go through the shipped code path: an empty fleet, pruned.
        self.write_toml(&[]);
        let _ = bento()
            .args(["server", "sync-accounts", "--prune", "--fleet"])
            .arg(self.fleet())
            .output();
        // Whatever is left (a prune that failed, a test that renamed things): by name.
        for host in &self.hosts {
            let account = self.account(host);
            if Command::new("id")
                .arg(&account)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                let _ = Command::new("userdel").args(["-f", &account]).status();
            }
        }
        remove_group(&self.group);
    }
}

/// Waits for `child` to exit; kills it and returns `None` at the deadline.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}
