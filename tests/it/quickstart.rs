//! README.md's quick start, run line by line (issue #25): every command line between
//! `<!-- quickstart -->` and `<!-- /quickstart -->`, in order, in one shell, on the real sshd
//! and real Nix, ending with the new host applying its version (exit 10). What the test
//! changes to run them here is in one place, `Machine::prepare` and `SUBSTITUTIONS`, and
//! each substitution must match a README line, so the README cannot drift from what runs.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::sshd::{group_of, remove_group, wait_with_deadline};
use crate::common::{toy_nix_path, unique_prefix, Accounts, ScratchDir, NIX_CONFIG};

/// Every command line of the `sh` blocks between the markers, in order; comments and blank
/// lines are left out (bash would skip them too).
fn quickstart_lines(readme: &str) -> Vec<String> {
    let start = readme
        .find("<!-- quickstart -->")
        .expect("README.md has a <!-- quickstart --> marker");
    let end = readme
        .find("<!-- /quickstart -->")
        .expect("README.md has a <!-- /quickstart --> marker");
    let mut lines = Vec::new();
    for block in readme[start..end].split("```sh\n").skip(1) {
        let block = &block[..block.find("```").expect("a closed sh block")];
        lines.extend(
            block
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    lines
}

/// The README lines this test cannot run as written, by how they start, and what it runs
/// instead. Everything else runs as written, in the machine `Machine::prepare` makes.
const SUBSTITUTIONS: &[(&str, &str)] = &[
    // The README shows a placeholder key; the admin pastes the line `bento agent init`
    // printed, which holds the key it made.
    (
        "bento host add web --key 'ssh-ed25519 AAAA… root@web'",
        "bento host add web --key \"$(cat /etc/bento/id_ed25519.pub)\"",
    ),
    // The admin sends agent-config's output to the machine, which saves it as the README's
    // comment line says: agent.toml and the known_hosts line it names.
    (
        "bento agent-config web ",
        "bento agent-config web > /etc/bento/agent.toml && bento agent-config web --json | jq -r .known_hosts_line > /etc/bento/known_hosts",
    ),
];

/// The README's lines with the substitutions made; panics on a substitution that matches
/// no line (the README changed: the test must follow).
fn runnable(lines: &[String]) -> Vec<String> {
    let mut out: Vec<String> = lines.to_vec();
    for (readme, instead) in SUBSTITUTIONS {
        let found: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, l)| l.starts_with(readme))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "substitution {readme:?} matches {} README lines: {lines:#?}",
            found.len()
        );
        out[found[0]] = (*instead).to_owned();
    }
    out
}

/// This test's machine: one mount and UTS namespace (`unshare`) in which the server and the
/// new host `web` both run, with private, empty `/etc/bento`, `/etc/ssh` (a fresh sshd
/// configuration: Debian's stock file and host keys), `/srv`, `/var/lib/bento` and
/// `/nix/var/nix/profiles`, so the README's default paths are this test's alone. Its sshd
/// listens on 127.0.0.1 at a free port; the accounts (global, like the group) get a
/// per-test prefix and group.
struct Machine {
    dir: ScratchDir,
    port: u16,
    prefix: String,
    group: String,
}

/// The directories the namespace gets private copies of (each an empty directory, except
/// /etc/ssh).
const PRIVATE: [&str; 5] = [
    "/etc/bento",
    "/etc/ssh",
    "/srv",
    "/var/lib/bento",
    "/nix/var/nix/profiles",
];

impl Machine {
    fn private(&self, dir: &str) -> PathBuf {
        self.dir.join("root").join(dir.trim_start_matches('/'))
    }
    fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }

    fn new() -> Self {
        let dir = ScratchDir::new();
        let prefix = unique_prefix();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        Machine {
            dir,
            port,
            group: group_of(&prefix),
            prefix,
        }
    }

    /// Everything the test does besides the README's lines: the private directories, the
    /// fresh sshd configuration, and three stand-ins on PATH:
    /// - `$EDITOR`: the admin editing bento.toml as the README's comment says (`address`,
    ///   `signing_key`), and what this test needs (`port`: its sshd's; `account_prefix` and
    ///   `group`: the test's own, since accounts and groups are the whole machine's);
    /// - `systemctl`: systemd is not PID 1 here, so `systemctl reload ssh` starts the test's
    ///   sshd (once, recording its pid) and waits until it greets;
    /// - `bento`: the binary under test.
    fn prepare(&self) -> String {
        for d in PRIVATE {
            fs::create_dir_all(self.private(d)).unwrap();
            fs::set_permissions(self.private(d), fs::Permissions::from_mode(0o755)).unwrap();
            // The mount point itself; on a machine without it, an empty directory.
            fs::create_dir_all(d).unwrap();
        }
        fs::create_dir_all(self.private("/etc/ssh/sshd_config.d")).unwrap();
        let keys = Command::new("ssh-keygen")
            .arg("-A")
            .arg("-f")
            .arg(self.dir.join("root"))
            .output()
            .unwrap();
        assert!(keys.status.success(), "{}", text(&keys));
        let stock = fs::read_to_string("/usr/share/openssh/sshd_config")
            .expect("Debian's stock sshd_config (openssh-server)");
        fs::write(
            self.private("/etc/ssh/sshd_config"),
            format!(
                "{stock}\n# The test's sshd: the loopback at a free port, no pid file.\nPort {}\nListenAddress 127.0.0.1\nPidFile none\n",
                self.port
            ),
        )
        .unwrap();
        fs::create_dir_all(self.dir.join("home")).unwrap();
        fs::create_dir_all(self.bin()).unwrap();
        let script = |name: &str, body: String| {
            let path = self.bin().join(name);
            fs::write(&path, body).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        };
        script(
            "editor",
            format!(
                "#!/bin/sh\nset -e\nsed -i \\\n  -e 's|^# address = .*|address = \"127.0.0.1\"\\nport = {port}\\nsigning_key = \"/etc/bento/signing_key\"\\ngroup = \"{group}\"|' \\\n  -e 's|^account_prefix = \"bento-\"|account_prefix = \"{prefix}\"|' \"$1\"\ngrep -q '^group = \"{group}\"' \"$1\" && grep -q '^account_prefix = \"{prefix}\"' \"$1\"\n",
                port = self.port,
                group = self.group,
                prefix = self.prefix
            ),
        );
        script(
            "systemctl",
            format!(
                "#!/bin/bash\n[ \"$*\" = \"reload ssh\" ] || {{ echo \"test systemctl: only 'reload ssh', not '$*'\" >&2; exit 1; }}\n\
                 pidfile={pid}\n\
                 if [ -s \"$pidfile\" ] && kill -0 \"$(cat \"$pidfile\")\" 2>/dev/null; then kill -HUP \"$(cat \"$pidfile\")\"; exit 0; fi\n\
                 setsid /usr/sbin/sshd -D -e </dev/null >>{log} 2>&1 &\n\
                 echo $! > \"$pidfile\"\n\
                 for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && exit 0; sleep 0.05; done\n\
                 echo \"test sshd did not listen on {port} within 10 s\" >&2; cat {log} >&2; exit 1\n",
                pid = self.dir.join("sshd.pid").display(),
                log = self.dir.join("sshd.log").display(),
                port = self.port
            ),
        );
        std::os::unix::fs::symlink(
            assert_cmd::cargo::cargo_bin("bento"),
            self.bin().join("bento"),
        )
        .unwrap();

        let mut prelude = String::from("set -u\n");
        for d in PRIVATE {
            prelude.push_str(&format!(
                "mount --bind {} {d} || exit 90\n",
                self.private(d).display()
            ));
        }
        prelude.push_str("hostname web || exit 91\n");
        prelude.push_str(&format!(
            "export HOME={home} EDITOR={bin}/editor PATH={bin}:$PATH\n",
            home = self.dir.join("home").display(),
            bin = self.bin().display()
        ));
        prelude
    }

    fn stop_sshd(&self) {
        let Ok(pid) = fs::read_to_string(self.dir.join("sshd.pid")) else {
            return;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            return;
        };
        // Only the sshd this test started (the pid could have been reused since).
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("sshd") {
            // SAFETY: kill(2) on the pid of the sshd this test started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop_sshd();
        remove_group(&self.group);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_readme_quick_start_runs_line_by_line_to_a_host_applying_its_version() {
    let readme =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let lines = quickstart_lines(&readme);
    assert!(
        lines.first().is_some_and(|l| l.starts_with("bento init "))
            && lines
                .last()
                .is_some_and(|l| l.starts_with("bento agent update")),
        "the quick start goes from `bento init` to `bento agent update`: {lines:#?}"
    );
    let m = Machine::new();
    let _accounts = Accounts {
        names: ["example", "web"]
            .iter()
            .map(|h| format!("{}{h}", m.prefix))
            .collect(),
    };
    let mut script = m.prepare();
    let run = runnable(&lines);
    let last = run.len() - 1;
    for (i, line) in run.iter().enumerate() {
        script.push_str(&format!("echo '>>> {}' >&2\n", line.replace('\'', "'\\''")));
        script.push_str(line);
        script.push('\n');
        if i < last {
            script.push_str(&format!(
                "st=$?; [ $st = 0 ] || {{ echo 'quick start line {} failed with exit status '$st >&2; exit 100; }}\n",
                i + 1
            ));
        }
    }
    fs::write(m.dir.join("quickstart.sh"), &script).unwrap();
    let _ = fs::create_dir_all("/run/sshd");

    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--uts", "--propagation", "private", "bash"])
        .arg(m.dir.join("quickstart.sh"))
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("NIX_PATH", toy_nix_path())
        .env_remove("BENTO_FLEET")
        .env("BENTO_TEST_ACTIVATION_LOG", m.dir.join("activations.log"))
        // The admin's git identity (a fresh root has none; `git commit` needs one).
        .env("GIT_AUTHOR_NAME", "Quick Start")
        .env("GIT_AUTHOR_EMAIL", "admin@example.org")
        .env("GIT_COMMITTER_NAME", "Quick Start")
        .env("GIT_COMMITTER_EMAIL", "admin@example.org")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("unshare (util-linux)");
    let out = wait_with_deadline(child, Duration::from_secs(300))
        .expect("the quick start finished within 300 s");
    let log = fs::read_to_string(m.dir.join("sshd.log")).unwrap_or_default();
    assert_eq!(
        out.status.code(),
        Some(crate::agent::EXIT_UPDATED),
        "{}\nsshd:\n{log}",
        text(&out)
    );
    let activations = fs::read_to_string(m.dir.join("activations.log")).unwrap();
    assert!(activations.contains("nixos-system-web-1"), "{activations}");
    // `bento agent check` passed on the way (a failing line stops the script): say so.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("signed by a key in trusted_keys"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_quick_start_lines_are_extracted_in_order_and_every_substitution_matches() {
    let readme = "intro\n```sh\nnot this\n```\n<!-- quickstart -->\n```sh\na  # c\n# only a comment\n\nb\n```\ntext\n```sh\nc\n```\n<!-- /quickstart -->\n```sh\nd\n```\n";
    assert_eq!(quickstart_lines(readme), ["a  # c", "b", "c"]);
    let real = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let lines = quickstart_lines(&real);
    let run = runnable(&lines);
    assert_eq!(run.len(), lines.len());
}
