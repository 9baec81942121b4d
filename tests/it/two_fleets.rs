//! Two fleets on one sshd (issue #25 item 4): each fleet's host accounts are in its own
//! `[server] group`, selected by its own `Match Group` block. A second fleet that would share
//! the first's group is refused by `sync-accounts` and flagged by `server check`, naming the
//! first fleet's account, its chroot and the fix; with a group of its own, one sshd serves
//! both and each host stays jailed in its own fleet's chroot.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::sshd::{group_of, remove_group, run_with_input, Sshd, SSHD};
use crate::common::{bento, unique_prefix, Accounts, ScratchDir};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Removes the second fleet's group (and its PAM limits file) when the test ends, after its
/// accounts (declared first, dropped last).
struct GroupGuard(String);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        remove_group(&self.0);
    }
}

/// The second fleet: its own repo, chroot, key directory and prefix, host `h1` like the
/// first's (a different account), with a fresh key.
struct Second {
    dir: ScratchDir,
    prefix: String,
}

impl Second {
    fn fleet(&self) -> PathBuf {
        self.dir.join("fleet")
    }
    fn chroot(&self) -> PathBuf {
        self.dir.join("chroot")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("h1_key")
    }
    fn account(&self) -> String {
        format!("{}h1", self.prefix)
    }

    fn new() -> Self {
        let s = Second {
            dir: ScratchDir::new(),
            prefix: unique_prefix(),
        };
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(s.key())
            .status()
            .unwrap();
        assert!(st.success());
        let host = s.fleet().join("hosts/h1");
        fs::create_dir_all(&host).unwrap();
        fs::write(
            host.join("configuration.nix"),
            "{ ... }: { hostName = \"h1\"; version = \"b\"; }\n",
        )
        .unwrap();
        s
    }

    fn write_toml(&self, group: &str) {
        let key = fs::read_to_string(self.key().with_extension("pub")).unwrap();
        fs::write(
            self.fleet().join("bento.toml"),
            format!(
                "[server]\nchroot = \"{}\"\nauthorized_keys_dir = \"{}\"\naccount_prefix = \"{}\"\ngroup = \"{group}\"\n\n[hosts.h1]\nkey = \"{}\"\n",
                self.chroot().display(),
                self.dir.join("authorized_keys").display(),
                self.prefix,
                key.trim()
            ),
        )
        .unwrap();
    }

    fn bento(&self, args: &[&str]) -> Output {
        bento()
            .args(args)
            .arg("--fleet")
            .arg(self.fleet())
            .output()
            .unwrap()
    }
}

/// `bento server check` of `fleet` against the sshd configuration `config`.
fn check(fleet: &Path, config: &Path) -> Output {
    bento()
        .args(["server", "check", "--fleet"])
        .arg(fleet)
        .arg("--sshd-config")
        .arg(config)
        .arg("--sshd")
        .arg(SSHD)
        .output()
        .unwrap()
}

/// `sftp -b -` into the first fleet's sshd as `account` with `key`.
fn sftp_as(first: &Sshd, account: &str, key: &Path, batch: &str) -> Output {
    let opts: Vec<String> = first
        .client_opts("h1")
        .into_iter()
        .map(|o| {
            if o.starts_with("User=") {
                format!("User={account}")
            } else if o.starts_with("IdentityFile=") {
                format!("IdentityFile={}", key.display())
            } else {
                o
            }
        })
        .collect();
    let mut cmd = Command::new("sftp");
    cmd.args(["-b", "-"]).args(opts).arg("127.0.0.1");
    run_with_input(cmd, batch, Duration::from_secs(60))
}

#[test]
fn a_second_fleet_needs_its_own_group_and_then_shares_the_sshd_jailed() {
    let mut first = Sshd::start(&["h1"]);
    first.publish();
    let second = Second::new();
    let second_group = group_of(&second.prefix);
    let _group = GroupGuard(second_group.clone());
    let _accounts = Accounts {
        names: vec![second.account()],
    };

    // In the first fleet's group: refused before anything changes, naming the first
    // fleet's account, its chroot and the fix.
    second.write_toml(&first.group);
    let out = second.bento(&["server", "sync-accounts"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for part in [
        format!(
            "group {} already holds account {} of another fleet",
            first.group,
            first.account("h1")
        ),
        format!("chroot {}", first.chroot().display()),
        format!("marked as the fleet with account_prefix {:?}", first.prefix),
        "[server] group = ".to_owned(),
        "one block each".to_owned(),
    ] {
        assert!(err.contains(&part), "{part}: {err}");
    }
    assert!(bento::sys::accounts::user(&second.account())
        .unwrap()
        .is_none());
    assert!(!second.chroot().join("h1").exists());
    // `host add` as root (the chroot is on this machine) refuses the same way, and leaves
    // bento.toml as it was.
    fs::create_dir_all(second.chroot()).unwrap();
    let toml_before = fs::read(second.fleet().join("bento.toml")).unwrap();
    let h2_key = second.dir.join("h2_key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&h2_key)
        .status()
        .unwrap();
    assert!(st.success());
    let out = bento()
        .args(["host", "add", "h2", "--key-file"])
        .arg(h2_key.with_extension("pub"))
        .arg("--fleet")
        .arg(second.fleet())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "group {} already holds account {} of another fleet",
            first.group,
            first.account("h1")
        )),
        "{}",
        text(&out)
    );
    assert_eq!(
        fs::read(second.fleet().join("bento.toml")).unwrap(),
        toml_before
    );
    assert!(!second.fleet().join("hosts/h2").exists());
    // `server check` of the second fleet says the same.
    let out = check(&second.fleet(), &first.config());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!(
            "already holds account {} of another fleet",
            first.account("h1")
        )),
        "{}",
        text(&out)
    );

    // The first fleet's own re-run is unchanged and still refuses nothing.
    let again = first.sync_accounts(false);
    assert!(
        again.contains(&first.account("h1")) && again.contains("unchanged"),
        "{again}"
    );

    // With a group of its own, the second fleet syncs and publishes.
    second.write_toml(&second_group);
    let out = second.bento(&["server", "sync-accounts"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = bento()
        .args(["publish", "--no-eval", "--fleet"])
        .arg(second.fleet())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // One sshd, each fleet's `sshd-config` as a drop-in of its own, as docs/server.md says.
    let dropins = first.dir.join("sshd/sshd_config.d");
    fs::create_dir_all(&dropins).unwrap();
    for (name, fleet) in [
        ("00-bento.conf", first.fleet()),
        ("01-second.conf", second.fleet()),
    ] {
        let out = bento()
            .args(["server", "sshd-config", "--fleet"])
            .arg(fleet)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        fs::write(dropins.join(name), &out.stdout).unwrap();
    }
    let base = fs::read_to_string(first.config()).unwrap();
    let globals = &base[..base.find("# bento: SFTP chroots").unwrap()];
    fs::write(
        first.config(),
        format!(
            "Include {}/*.conf\n{}",
            dropins.display(),
            globals.replace(
                &format!("AllowGroups {}\n", first.group),
                &format!("AllowGroups {} {second_group}\n", first.group)
            )
        ),
    )
    .unwrap();
    first.restart();

    // Both fleets pass `server check` against it.
    for fleet in [first.fleet(), second.fleet()] {
        let out = check(&fleet, &first.config());
        assert!(out.status.success(), "{}: {}", fleet.display(), text(&out));
    }
    // Each host logs in to its own chroot only.
    let listing = |out: &Output| String::from_utf8_lossy(&out.stdout).into_owned();
    let own = first.sftp("h1", "ls /manifests\n");
    assert!(own.status.success(), "{}{}", text(&own), first.log());
    let second_key = second.key();
    let theirs = sftp_as(&first, &second.account(), &second_key, "ls /manifests\n");
    assert!(theirs.status.success(), "{}{}", text(&theirs), first.log());
    assert_ne!(
        listing(&own),
        listing(&theirs),
        "two fleets, two different versions"
    );
    // The first fleet's host cannot log in as the second fleet's account, nor reach its
    // chroot from its own jail.
    let cross = sftp_as(&first, &second.account(), &first.client_key("h1"), "ls /\n");
    assert!(!cross.status.success(), "{}", text(&cross));
    let current = second.chroot().join("h1/current");
    assert!(current.is_file());
    let reach = first.sftp("h1", &format!("get {} /dev/null\n", current.display()));
    assert!(!reach.status.success(), "{}", text(&reach));

    // The second fleet's accounts go with it (the first's with its harness).
    fs::write(
        second.fleet().join("bento.toml"),
        format!(
            "[server]\nchroot = \"{}\"\nauthorized_keys_dir = \"{}\"\naccount_prefix = \"{}\"\ngroup = \"{second_group}\"\n",
            second.chroot().display(),
            second.dir.join("authorized_keys").display(),
            second.prefix
        ),
    )
    .unwrap();
    let out = second.bento(&["server", "sync-accounts", "--prune"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(bento::sys::accounts::user(&second.account())
        .unwrap()
        .is_none());
}
