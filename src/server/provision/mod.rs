//! Provisioning the SFTP server: host keys, the sshd policy (rendered for NixOS and for any
//! other sshd), accounts, and live checks. Rendering is pure text from `bento.toml`; only
//! `sync` and `check` touch the system.

pub mod check;
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

/// The group sshd's `Match` block selects; every host account is in it, nothing else should be.
pub const GROUP: &str = "bento";

/// `MaxStartups` the generated config sets: see docs/server.md for the reasoning.
pub const MAX_STARTUPS: &str = "100:30:200";
/// `PerSourceMaxStartups` the generated config sets: one source address (one host, one
/// attacker) may hold at most this many of the `MaxStartups` pre-auth slots, below the 100
/// at which sshd starts dropping for everyone, above a 50-host burst from behind one NAT.
/// Global-only in sshd_config(5) (OpenSSH ≥ 8.5); see docs/server.md.
pub const PER_SOURCE_MAX_STARTUPS: u32 = 64;
/// `MaxSessions` per connection for host accounts: see docs/server.md.
pub const MAX_SESSIONS: u32 = 4;
/// The only thing a host account may run. `-d /` starts in the chroot root; `-u 0027` keeps
/// uploads private whatever mode the client sends; `-P` denies link creation, so a host cannot
/// plant a link in `logs/` that a root reader would follow into another host's chroot.
pub const FORCE_COMMAND: &str = "internal-sftp -d / -u 0027 -P symlink,hardlink";
