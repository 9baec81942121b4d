//! The real server side for the network scenarios: a private OpenSSH sshd on 127.0.0.1 at a
//! free port, configured with exactly what `bento server sshd-config` prints, and one
//! account and ed25519 key per host made by `bento server sync-accounts` under a unique
//! account prefix. Accounts, sshd and files are undone through `cleanup` (pruned accounts,
//! sshd stopped by its pid after checking its command line, directories removed).

use std::fs;
use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cleanup::{self, Guard};
use crate::proc::run_ok;

/// sshd refuses chroots and key files under group- or world-writable directories (/tmp).
pub const SCRATCH_BASE: &str = "/var/lib/bento-bench";
pub const SSHD: &str = "/usr/sbin/sshd";
/// Offline Nix for every agent: no substituters, no registry, builds as root, no sandbox
/// (the toy systems' builder is /bin/sh).
pub const NIX_CONFIG: &str = "sandbox = false
experimental-features = nix-command flakes
build-users-group =
substituters =
flake-registry =";

pub fn bento_bin() -> &'static str {
    env!("CARGO_BIN_EXE_bento")
}

/// `bento` with the offline Nix settings and no inherited fleet.
pub fn bento() -> Command {
    let mut cmd = Command::new(bento_bin());
    cmd.env("NIX_CONFIG", NIX_CONFIG)
        .env_remove("BENTO_FLEET")
        .env("BENTO_LOG", "bento=warn")
        // A `<nixpkgs/nixos>` for classic hosts, as a server has: publish evaluates them.
        .env(
            "NIX_PATH",
            format!("nixpkgs={}", crate::machine::toy_nixpkgs().display()),
        );
    cmd
}

fn mkdir(path: &Path, mode: u32) {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A root-owned 0755 directory under /var/lib/bento-bench, removed when dropped.
pub struct Scratch {
    pub path: PathBuf,
    _guard: Guard,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        mkdir(Path::new(SCRATCH_BASE), 0o755);
        let path = tempfile::Builder::new()
            .prefix(&format!("{tag}-"))
            .tempdir_in(SCRATCH_BASE)
            .expect("scratch dir")
            .keep();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        let p = path.clone();
        let guard = cleanup::register("scratch directory", move || {
            let _ = fs::remove_dir_all(&p);
            // The base goes too when no other run uses it.
            let _ = fs::remove_dir(SCRATCH_BASE);
        });
        Scratch {
            path,
            _guard: guard,
        }
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

/// A running sshd and the fleet repo whose hosts it serves.
pub struct Server {
    pub dir: PathBuf,
    pub port: u16,
    pub prefix: String,
    // Dropped in this order: sshd first, then the accounts.
    _sshd: Option<Guard>,
    _accounts: Guard,
}

/// A fresh account prefix, `bb` + 4 random letters + `-`: concurrent runs never collide.
fn unique_prefix() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let tag: String = (0..4).map(|_| rng.gen_range(b'a'..=b'z') as char).collect();
    format!("bb{tag}-")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The fleet's own group: the prefix without its dash. One sshd `Match Group` block serves
/// one fleet, and `sync-accounts` refuses a group that holds another fleet's accounts (say,
/// those a killed run left), so every run has its own.
fn group_of(prefix: &str) -> &str {
    prefix.trim_end_matches('-')
}

fn write_toml(fleet: &Path, chroot: &Path, keys: &Path, prefix: &str, hosts: &[(String, String)]) {
    let mut text = format!(
        "[server]\nchroot = \"{}\"\nauthorized_keys_dir = \"{}\"\naccount_prefix = \"{prefix}\"\ngroup = \"{}\"\n",
        chroot.display(),
        keys.display(),
        group_of(prefix),
    );
    for (host, key) in hosts {
        text.push_str(&format!("\n[hosts.{host}]\nkey = \"{key}\"\n"));
    }
    fs::create_dir_all(fleet).unwrap();
    fs::write(fleet.join("bento.toml"), text).unwrap();
}

impl Server {
    /// Keys, accounts and sshd for `hosts`; each host gets a placeholder classic
    /// configuration that the scenario overwrites before publishing.
    pub fn start(dir: &Path, hosts: &[String]) -> Server {
        mkdir(Path::new("/run/sshd"), 0o755); // privilege separation; absent on a fresh box
        let prefix = unique_prefix();
        mkdir(dir, 0o755);
        for sub in ["client", "sshd", "fleet", "chroot"] {
            mkdir(&dir.join(sub), if sub == "chroot" { 0o755 } else { 0o700 });
        }
        run_ok(
            Command::new("ssh-keygen")
                .args([
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "bento-bench-sshd",
                    "-f",
                ])
                .arg(dir.join("sshd/host_key")),
            Duration::from_secs(30),
        );
        // Client keys, four ssh-keygens at a time (500 hosts take a few seconds).
        std::thread::scope(|s| {
            for chunk in hosts.chunks(hosts.len().div_ceil(4).max(1)) {
                s.spawn(move || {
                    for h in chunk {
                        run_ok(
                            Command::new("ssh-keygen")
                                .args(["-q", "-t", "ed25519", "-N", "", "-C"])
                                .arg(format!("{h}@bento-bench"))
                                .arg("-f")
                                .arg(dir.join("client").join(h)),
                            Duration::from_secs(30),
                        );
                    }
                });
            }
        });
        let fleet = dir.join("fleet");
        let keyed: Vec<(String, String)> = hosts
            .iter()
            .map(|h| {
                let public = fs::read_to_string(dir.join("client").join(format!("{h}.pub")))
                    .expect("public key");
                (h.clone(), public.trim().to_owned())
            })
            .collect();
        for h in hosts {
            let hd = fleet.join("hosts").join(h);
            fs::create_dir_all(&hd).unwrap();
            fs::write(
                hd.join("configuration.nix"),
                format!("{{ ... }}: {{ hostName = \"{h}\"; }}\n"),
            )
            .unwrap();
        }
        let (chroot, keys) = (dir.join("chroot"), dir.join("authorized_keys"));
        write_toml(&fleet, &chroot, &keys, &prefix, &keyed);

        // Registered before the first account exists, so an interruption prunes them.
        let accounts = {
            let (fleet, prefix, hosts) = (fleet.clone(), prefix.clone(), hosts.to_vec());
            cleanup::register("host accounts", move || {
                write_toml(&fleet, &chroot, &keys, &prefix, &[]);
                let _ = bento()
                    .args(["server", "sync-accounts", "--prune", "--fleet"])
                    .arg(&fleet)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                for h in &hosts {
                    let account = format!("{prefix}{h}");
                    let exists = Command::new("id")
                        .arg(&account)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success());
                    if exists {
                        let _ = Command::new("userdel").args(["-f", &account]).status();
                    }
                }
                let group = group_of(&prefix);
                let _ = fs::remove_file(bento::server::provision::limits_file(group));
                let _ = Command::new("groupdel")
                    .arg(group)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            })
        };
        run_ok(
            bento()
                .args(["server", "sync-accounts", "--fleet"])
                .arg(&fleet),
            Duration::from_secs(600),
        );

        let mut server = Server {
            dir: dir.to_owned(),
            port: 0,
            prefix,
            _sshd: None,
            _accounts: accounts,
        };
        let mut last_error = String::new();
        for _ in 0..5 {
            server.port = free_port();
            server.write_sshd_config();
            match server.spawn_sshd() {
                Ok(guard) => {
                    server._sshd = Some(guard);
                    break;
                }
                Err(e) => last_error = e,
            }
        }
        assert!(server._sshd.is_some(), "sshd did not start: {last_error}");
        let host_key = fs::read_to_string(dir.join("sshd/host_key.pub")).unwrap();
        let key: Vec<&str> = host_key.split_whitespace().take(2).collect();
        fs::write(
            server.known_hosts(),
            format!("[127.0.0.1]:{} {}\n", server.port, key.join(" ")),
        )
        .unwrap();
        server
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
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }
    pub fn account(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }
    pub fn client_key(&self, host: &str) -> PathBuf {
        self.dir.join("client").join(host)
    }
    fn config(&self) -> PathBuf {
        self.dir.join("sshd/sshd_config")
    }
    fn log_path(&self) -> PathBuf {
        self.dir.join("sshd/sshd.log")
    }

    /// A known_hosts line for the server's key as seen on another port (a relay's).
    pub fn known_hosts_for(&self, port: u16) -> String {
        let line = fs::read_to_string(self.known_hosts()).unwrap();
        let key = line.split_once(' ').expect("known_hosts line").1;
        format!("{line}[127.0.0.1]:{port} {key}")
    }

    /// `bento publish` of the fleet into the chroot (as root: owners set, accounts exist).
    pub fn publish(&self) {
        run_ok(
            bento()
                .args(["publish", "--fleet"])
                .arg(self.fleet())
                .arg("--chroot")
                .arg(self.chroot()),
            Duration::from_secs(600),
        );
    }

    fn write_sshd_config(&self) {
        let block = run_ok(
            bento()
                .args(["server", "sshd-config", "--fleet"])
                .arg(self.fleet()),
            Duration::from_secs(30),
        );
        let text = format!(
            "# bento benchmark sshd: loopback only, public keys only\n\
             ListenAddress 127.0.0.1\n\
             Port {port}\n\
             HostKey {key}\n\
             PidFile none\n\
             LogLevel INFO\n\
             StrictModes yes\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin no\n\
             UsePAM no\n\
             AllowGroups {group}\n\
             AuthorizedKeysFile none\n\
             Subsystem sftp internal-sftp\n\
             {block}",
            port = self.port,
            group = group_of(&self.prefix),
            key = self.dir.join("sshd/host_key").display(),
            block = String::from_utf8_lossy(&block.stdout),
        );
        fs::write(self.config(), text).unwrap();
        run_ok(
            Command::new(SSHD).arg("-t").arg("-f").arg(self.config()),
            Duration::from_secs(30),
        );
    }

    /// Starts sshd and waits (at most 10 s) for its greeting.
    fn spawn_sshd(&self) -> Result<Guard, String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(self.config())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {SSHD}: {e}"))?;
        let pid = child.id();
        let config = self.config();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "sshd exited ({status}): {}",
                    fs::read_to_string(self.log_path()).unwrap_or_default()
                ));
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut banner = [0u8; 8];
                if s.read_exact(&mut banner).is_ok() && &banner == b"SSH-2.0-" {
                    return Ok(cleanup::register("sshd", move || {
                        stop_sshd(child, pid, &config)
                    }));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err("sshd did not greet within 10 s".into())
    }
}

/// SIGTERM to our sshd by pid, after checking the pid is still that sshd; bounded wait.
fn stop_sshd(mut child: std::process::Child, pid: u32, config: &Path) {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = String::from_utf8_lossy(&cmdline).contains(&*config.to_string_lossy());
    if ours {
        // SAFETY: kill(2) on our own child's pid, checked above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}
