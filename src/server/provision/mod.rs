//! Provisioning the SFTP server: host keys, the sshd policy (rendered for NixOS and for any
//! other sshd), accounts, and live checks. Rendering is pure text from `bento.toml`; only
//! `sync` and `check` touch the system.

pub mod check;
pub mod claim;
// Issue #25: two fleets on one sshd, each with its own `[server] group`.
pub mod group;
pub mod keys;
pub mod nixos;
pub mod sshd;
// Issue #25: a Match block before bento's that captures the hosts' accounts.
pub mod sshd_order;
pub mod sync;
mod system;

pub use check::{check, CheckOptions, CheckReport, HostCheck};
pub use keys::{fleet_keys, KeyError, KeyErrors, PublicKey};
pub use sshd::{match_block, sshd_config, PathError};
pub use sync::{sync_accounts, SyncAction, SyncError, SyncReport};

/// `MaxStartups` the generated config sets: see docs/server.md for the reasoning.
pub const MAX_STARTUPS: &str = "100:30:200";
/// `PerSourceMaxStartups` the generated config sets: one source address (one host, one
/// attacker) may hold at most this many of the `MaxStartups` pre-auth slots, below the 100
/// at which sshd starts dropping for everyone, above a 50-host burst from behind one NAT.
/// Global-only in sshd_config(5) (OpenSSH ≥ 8.5); see docs/server.md.
pub const PER_SOURCE_MAX_STARTUPS: u32 = 64;
/// `MaxSessions` per connection for host accounts: see docs/server.md.
pub const MAX_SESSIONS: u32 = 4;
/// Processes one host account may run at once (`nproc` in PAM's limits for the fleet's group):
/// each SFTP connection holds two (sshd's child as the account and its sftp session), so
/// this is about 8 connections per host, where an agent needs one or two. sshd itself has
/// no per-account connection limit (`MaxStartups` is pre-auth and global, `MaxSessions`
/// per connection): see docs/server.md.
pub const MAX_PROCESSES: u32 = 16;
/// Where pam_limits reads extra limits (`limits.d/*.conf`).
pub const LIMITS_DIR: &str = "/etc/security/limits.d";

/// The PAM limits file `sync-accounts` writes for the fleet whose group is `group`: one
/// per group, so two fleets on one server never overwrite each other's
/// (`/etc/security/limits.d/bento.conf` for the default group).
pub fn limits_file(group: &str) -> std::path::PathBuf {
    std::path::Path::new(LIMITS_DIR).join(format!("{group}.conf"))
}

/// The lines of `limits_file(group)`.
pub fn limits_conf(group: &str) -> String {
    format!(
        "# bento: host accounts may run at most {MAX_PROCESSES} processes at once (about {} SFTP\n\
         # connections); needs sshd with UsePAM yes. Written by `bento server sync-accounts`.\n\
         @{group} hard nproc {MAX_PROCESSES}\n",
        MAX_PROCESSES / 2
    )
}
/// The only thing a host account may run. `-d /` starts in the chroot root; `-u 0027` keeps
/// uploads private whatever mode the client sends; `-P` denies link creation, so a host cannot
/// plant a link in `logs/` that a root reader would follow into another host's chroot.
pub const FORCE_COMMAND: &str = "internal-sftp -d / -u 0027 -P symlink,hardlink";
