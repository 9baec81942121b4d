//! `bento init`: a new fleet repo with one commented example host.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const BENTO_TOML: &str = r#"# bento fleet settings. `bento publish` reads this file; keep it in git with the hosts.
#
# Layout of this repository:
#   bento.toml             this file
#   hosts/<name>/          one directory per host (configuration.nix), or a flake directory
#                          (flake.nix) defining several hosts in nixosConfigurations
#   hosts/<name>/files/    files installed verbatim on the host, outside the Nix store
#                          (secrets); hosts/<name>/files.toml sets target, owner, group, mode
#   common/                shared modules; link them into hosts: common -> ../../common
#
# After a change: `bento publish` copies each host's configuration (links resolved) into
# <chroot>/<host>/, which OpenSSH serves to that host alone.

[server]
# The name or address hosts use to reach this server over SSH.
# address = "bento.example.org"
# port = 22
# The public half of this server's SSH host key, for the agents' known_hosts
# (`bento agent-config`); the default is OpenSSH's.
# host_key = "/etc/ssh/ssh_host_ed25519_key.pub"
# Where per-host chroots live (every directory on this path must be root-owned).
chroot = "/srv/bento"
# Host "alpha" logs in as account "bento-alpha".
account_prefix = "bento-"
# The group of the hosts' accounts, which sshd's `Match Group` block jails; a second fleet
# served by the same sshd needs its own.
# group = "bento"

# One table per host: its SSH public key (from /etc/bento/id_ed25519.pub on the host).
[hosts.example]
# key = "ssh-ed25519 AAAA... root@example"
"#;

/// The example host's configuration.nix, for a host named `@NAME@` (`bento init` names it
/// `example`; `bento host add` gives each new host its own copy).
const CONFIGURATION_NIX: &str = r#"# The configuration of host @NAME@ (its directory's name is the host's name in the fleet).
{ config, lib, pkgs, ... }:
{
  imports = [
    ./common/base.nix
    # The machine's own hardware-configuration.nix (`nixos-generate-config --show-hardware-config`),
    # copied beside this file; uncomment once it is there:
    # ./hardware-configuration.nix
  ];

  networking.hostName = "@NAME@";

  # Stand-ins so the example evaluates before the hardware configuration is imported; that
  # file's settings take precedence over these defaults.
  fileSystems."/" = lib.mkDefault { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };
  boot.loader.grub.device = lib.mkDefault "nodev";

  system.stateVersion = "24.05";
}
"#;

/// The example configuration.nix for host `name`.
pub fn example_configuration(name: &str) -> String {
    CONFIGURATION_NIX.replace("@NAME@", name)
}

const COMMON_BASE_NIX: &str = r#"# Settings shared by every host. Hosts link this directory: hosts/<name>/common -> ../../common
{ config, pkgs, ... }:
{
  services.openssh.enable = true;
  time.timeZone = "UTC";
}
"#;

const GITIGNORE: &str = "result\nresult-*\n";

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0} already holds a fleet (bento.toml); not overwriting it")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Creates the fleet layout in `dir`; returns the files created.
pub fn init(dir: &Path) -> Result<Vec<PathBuf>, InitError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| InitError::Io { path, source }
    };
    if dir.join(crate::server::fleet::FLEET_FILE).exists() {
        return Err(InitError::Exists(dir.to_owned()));
    }
    let example = example_configuration("example");
    let files: [(&str, &str); 4] = [
        ("bento.toml", BENTO_TOML),
        ("hosts/example/configuration.nix", &example),
        ("common/base.nix", COMMON_BASE_NIX),
        (".gitignore", GITIGNORE),
    ];
    // Refuse before writing anything, so a half-made fleet never exists.
    for (rel, _) in &files {
        if dir.join(rel).exists() {
            return Err(InitError::Exists(dir.join(rel)));
        }
    }
    let mut created = Vec::new();
    for (rel, text) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        fs::write(&path, text).map_err(io(&path))?;
        created.push(path);
    }
    let link = dir.join("hosts/example/common");
    std::os::unix::fs::symlink("../../common", &link).map_err(io(&link))?;
    created.push(link);
    Ok(created)
}

/// What `bento init` did about git.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Git {
    /// A new repository with the fleet as its first commit.
    Committed,
    /// The directory is already inside a repository: nothing was committed for the user.
    InsideRepo(PathBuf),
    /// git is missing or failed: the fleet is there, not in a repository.
    Failed(String),
}

/// Makes `dir` a git repository whose first commit holds the new fleet, so the first
/// publish records a commit and is not "dirty". Leaves an enclosing repository alone.
pub fn git_init(dir: &Path) -> Git {
    use crate::sys::process::Cmd;
    let git = |args: &[&str]| {
        Cmd::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .timeout(std::time::Duration::from_secs(60))
            .run()
    };
    if let Ok(out) = git(&["rev-parse", "--show-toplevel"]) {
        return Git::InsideRepo(PathBuf::from(out.stdout_text().trim()));
    }
    // An identity only where the user has none, so a fresh machine can still commit.
    let has_identity = git(&["config", "user.email"]).is_ok();
    let mut commit = vec![];
    if !has_identity {
        commit.extend([
            "-c",
            "user.name=bento init",
            "-c",
            "user.email=bento@localhost",
        ]);
    }
    commit.extend(["commit", "-q", "-m", "A new bento fleet (bento init)"]);
    for args in [&["init", "-q"][..], &["add", "-A"][..], &commit[..]] {
        if let Err(e) = git(args) {
            return Git::Failed(e.to_string());
        }
    }
    Git::Committed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_loadable_fleet_and_refuses_twice() {
        let t = tempfile::tempdir().unwrap();
        let created = init(t.path()).unwrap();
        assert_eq!(created.len(), 5);
        let fleet = crate::server::fleet::Fleet::load(t.path()).unwrap();
        assert_eq!(fleet.config.hosts.len(), 1);
        assert!(matches!(init(t.path()), Err(InitError::Exists(_))));
    }
}
