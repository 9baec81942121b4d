//! `sync-accounts`: makes the system's host accounts and authorized-keys files match
//! `bento.toml` on a non-NixOS server, idempotently. Everything that can be refused (bad
//! keys, unsafe paths) is refused before the first change; after that each host is synced
//! on its own, so one failing host never stops the others.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::protocol::layout::Chroot;
use crate::server::chroot::{self, prepare_host_dir, unsafe_component, ChrootError, Ownership};
use crate::server::fleet::{FleetConfig, HostName};
use crate::sys::accounts;
use crate::sys::atomic;

use super::claim;
use super::group::{self, GroupError};
use super::keys::{fleet_keys, KeyErrors, PublicKey};
use super::sshd::{check_server_paths, PathError};
use super::system::{self, CommandError};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("sync-accounts creates system accounts and must run as root")]
    NotRoot,
    #[error(transparent)]
    Keys(#[from] KeyErrors),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("{path}: {problem}; sshd refuses chroots and key files below such a directory")]
    UnsafePath { path: PathBuf, problem: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Name(#[from] crate::protocol::NameError),
    #[error(transparent)]
    Chroot(#[from] ChrootError),
    #[error("{}", foreign_message(.0))]
    Foreign(Vec<Foreign>),
    #[error(transparent)]
    Claim(#[from] super::claim::ClaimError),
    #[error(transparent)]
    Group(#[from] GroupError),
}

/// An existing account a host of the fleet would use that is not one of the fleet's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    pub account: String,
    pub reason: String,
}

fn foreign_message(all: &[Foreign]) -> String {
    all.iter()
        .map(|f| {
            format!(
                "account {} already exists and is not a bento host account of this fleet ({}); refusing to change it: choose another account_prefix or host name, or remove the account yourself",
                f.account, f.reason
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub use super::group::ACCOUNT_COMMENT;

/// Why the existing account `info` may not serve as the host account whose jail is `home`,
/// or `None` when it is this fleet's. Accounts made before bento wrote its comment (empty
/// comment, nologin shell, in the fleet's group, home already the host's directory) count.
fn not_ours(
    info: &accounts::Account,
    home: &Path,
    group: &str,
) -> Result<Option<String>, SyncError> {
    let home = home.display().to_string();
    if info.uid == 0 || info.gid == 0 {
        return Ok(Some(format!("uid {} gid {}", info.uid, info.gid)));
    }
    if info.home != home {
        return Ok(Some(format!("its home is {}, not {home}", info.home)));
    }
    if info.gecos == ACCOUNT_COMMENT {
        return Ok(None);
    }
    let legacy = info.gecos.is_empty()
        && info.shell == system::nologin()
        && system::groups_of(&info.name)?.iter().any(|g| g == group);
    Ok((!legacy).then(|| format!("it was not made by bento: comment {:?}", info.gecos)))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SyncError + '_ {
    move |source| SyncError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncAction {
    Created,
    Updated,
    Unchanged,
    Removed,
    Failed,
}

/// What happened to one account.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    /// The host, for accounts of the fleet; `None` for pruned accounts of unknown hosts.
    pub host: Option<HostName>,
    pub account: String,
    pub action: SyncAction,
    /// What changed, or why it failed.
    pub details: Vec<String>,
}

/// Creates, updates and (with `prune`) removes host accounts and key files.
pub fn sync_accounts(config: &FleetConfig, prune: bool) -> Result<Vec<SyncReport>, SyncError> {
    if !accounts::is_root() {
        return Err(SyncError::NotRoot);
    }
    let server = &config.server;
    check_server_paths(server)?;
    let keys = fleet_keys(config)?;
    let chroot = Chroot::new(&server.chroot);
    // A chroot root marked by another fleet is refused before anything changes.
    claim::check(&chroot, &server.account_prefix)?;
    // One sshd `Match Group` block jails one fleet: a group that already holds another
    // fleet's accounts (or anyone else) is refused before anything changes.
    group::refuse_strangers(config)?;
    // An existing account that is not this fleet's (an operator's, another fleet's, root)
    // is refused before anything changes.
    let mut foreign = Vec::new();
    for host in keys.keys() {
        let account = config.account(host)?;
        let info = accounts::user(&account).map_err(io_err(Path::new("/etc/passwd")))?;
        if let Some(info) = &info {
            if let Some(reason) = not_ours(info, &chroot.host_dir(host), &server.group)? {
                foreign.push(Foreign { account, reason });
                continue;
            }
        }
        claim::check_jail(&chroot.host_dir(host), &account, info.map(|i| i.gid))?;
    }
    if !foreign.is_empty() {
        return Err(SyncError::Foreign(foreign));
    }
    for dir in [&server.chroot, &server.authorized_keys_dir] {
        if let Some((path, problem)) = unsafe_component(dir).map_err(io_err(dir))? {
            return Err(SyncError::UnsafePath { path, problem });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io_err(dir))?;
    }
    // sshd opens a key file with the account's own privileges, so the accounts must be
    // able to reach it (a 0700 directory, e.g. from a strict umask, locks every host out).
    let keys_dir = &server.authorized_keys_dir;
    let mode = fs::metadata(keys_dir).map_err(io_err(keys_dir))?.mode();
    if mode & 0o055 != 0o055 {
        fs::set_permissions(keys_dir, fs::Permissions::from_mode(0o755))
            .map_err(io_err(keys_dir))?;
    }
    ensure_group(&server.group)?;
    if let Some(marked) = claim::mark(&chroot, &server.account_prefix)? {
        tracing::info!("{marked}");
    }
    write_limits(&server.group)?;

    let mut reports = Vec::new();
    let mut wanted = BTreeSet::new();
    for (host, key) in &keys {
        let account = config.account(host)?;
        wanted.insert(account.clone());
        let report = match sync_host(config, &chroot, host, &account, key.as_ref()) {
            Ok(changes) if changes.first().is_some_and(|c| c == "created") => SyncReport {
                host: Some(host.clone()),
                account,
                action: SyncAction::Created,
                details: changes[1..].to_vec(),
            },
            Ok(changes) => SyncReport {
                host: Some(host.clone()),
                account,
                action: if changes.is_empty() {
                    SyncAction::Unchanged
                } else {
                    SyncAction::Updated
                },
                details: changes,
            },
            Err(e) => SyncReport {
                host: Some(host.clone()),
                account,
                action: SyncAction::Failed,
                details: vec![e.to_string()],
            },
        };
        reports.push(report);
    }
    if prune {
        reports.extend(prune_accounts(config, &chroot, &wanted)?);
    }
    Ok(reports)
}

/// Caps the processes of every host account (PAM's `nproc` for the fleet's group), where
/// PAM's limits directory exists; sshd applies it with `UsePAM yes` (Debian's default).
fn write_limits(group: &str) -> Result<(), SyncError> {
    let path = &super::limits_file(group);
    let Some(dir) = path.parent().filter(|d| d.is_dir()) else {
        tracing::warn!(
            "no {}: host accounts get no process limit (install PAM's limits, see docs/server.md)",
            path.parent()
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default()
        );
        return Ok(());
    };
    let want = super::limits_conf(group);
    if fs::read_to_string(path).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    atomic::write_file(path, want.as_bytes(), 0o644).map_err(io_err(dir))?;
    tracing::info!(
        "wrote {}: each host account runs at most {} processes",
        path.display(),
        super::MAX_PROCESSES
    );
    Ok(())
}

fn ensure_group(group: &str) -> Result<(), SyncError> {
    if accounts::group(group)
        .map_err(io_err(Path::new("/etc/group")))?
        .is_some()
    {
        return Ok(());
    }
    if let Err(e) = system::run("groupadd", &["--system", group]) {
        // Another sync may have created it in the meantime.
        if accounts::group(group)
            .map_err(io_err(Path::new("/etc/group")))?
            .is_none()
        {
            return Err(e.into());
        }
    }
    Ok(())
}

/// Syncs one host; returns what changed ("created" first for a new account).
fn sync_host(
    config: &FleetConfig,
    chroot: &Chroot,
    host: &HostName,
    account: &str,
    key: Option<&PublicKey>,
) -> Result<Vec<String>, SyncError> {
    let mut changes = Vec::new();
    let home = chroot.host_dir(host);
    let home_s = home.display().to_string();
    let shell = system::nologin();
    let etc = Path::new("/etc/passwd");
    let group = config.server.group.as_str();
    let existing = accounts::user(account).map_err(io_err(etc))?;
    // Another account's jail (another fleet sharing the chroot) is never taken over.
    claim::check_jail(&home, account, existing.as_ref().map(|a| a.gid))?;
    match existing {
        None => {
            system::run(
                "useradd",
                &[
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    &home_s,
                    "--shell",
                    shell,
                    "--comment",
                    ACCOUNT_COMMENT,
                    "--user-group",
                    "--groups",
                    group,
                    account,
                ],
            )?;
            changes.push("created".to_owned());
        }
        Some(a) => {
            // Checked again here: the account may have changed since the check up front.
            if let Some(reason) = not_ours(&a, &home, group)? {
                return Err(SyncError::Foreign(vec![Foreign {
                    account: account.to_owned(),
                    reason,
                }]));
            }
            if a.gecos != ACCOUNT_COMMENT {
                system::run("usermod", &["--comment", ACCOUNT_COMMENT, account])?;
                changes.push("marked as a bento host account".to_owned());
            }
            if a.shell != shell {
                system::run("usermod", &["--shell", shell, account])?;
                changes.push(format!("shell {} -> {shell}", a.shell));
            }
            if !system::groups_of(account)?.iter().any(|g| g == group) {
                system::run("usermod", &["--append", "--groups", group, account])?;
                changes.push(format!("added to group {group}"));
            }
        }
    }
    // useradd leaves the password "!" (locked); sshd without PAM refuses locked accounts
    // even for public keys. "*" matches no password and is not a lock.
    if system::shadow_password(account)?.as_deref() != Some("*") {
        system::run("usermod", &["--password", "*", account])?;
        if changes.first().map(String::as_str) != Some("created") {
            changes.push("unlocked for key logins".to_owned());
        }
    }
    let key_file = config.server.authorized_keys_dir.join(account);
    if write_key_file(&key_file, key)? {
        changes.push(match key {
            Some(_) => format!("key written to {}", key_file.display()),
            None => format!("no key in bento.toml: removed {}", key_file.display()),
        });
    }
    let before = claim::ownership(&home);
    prepare_host_dir(
        &home,
        host,
        &Ownership::Root {
            prefix: config.server.account_prefix.clone(),
        },
        // Accounts change in this run: each is looked up as it is now.
        crate::sys::accounts::user,
    )?;
    // Every owner or mode put right is said: a silent fix would hide a tampered jail.
    changes.extend(claim::changes(&before, &claim::ownership(&home)));
    if config.server.backups {
        let dir = home.join(crate::protocol::layout::BACKUPS);
        if !dir.exists() {
            changes.push(format!("created {}", dir.display()));
        }
        chroot::prepare_backups_dir(&home, host, &config.server.account_prefix)?;
    }
    Ok(changes)
}

/// Makes the key file hold exactly `restrict <key>`, root-owned 0644, or removes it when
/// the host has no key. Returns whether anything changed.
fn write_key_file(path: &Path, key: Option<&PublicKey>) -> Result<bool, SyncError> {
    let current = match fs::symlink_metadata(path) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(path)(e)),
    };
    let Some(key) = key else {
        if current.is_some() {
            fs::remove_file(path).map_err(io_err(path))?;
            return Ok(true);
        }
        return Ok(false);
    };
    let wanted = format!("{}\n", key.authorized_line());
    if let Some(meta) = &current {
        let same = meta.is_file()
            && meta.uid() == 0
            && meta.permissions().mode() & 0o7777 == 0o644
            && fs::read(path).map_err(io_err(path))? == wanted.as_bytes();
        if same {
            return Ok(false);
        }
        if meta.is_dir() {
            fs::remove_dir_all(path).map_err(io_err(path))?;
        }
    }
    // write_file sets the mode exactly (no umask): sshd wants a root 0644 file.
    atomic::write_file(path, wanted.as_bytes(), 0o644).map_err(io_err(path))?;
    Ok(true)
}

/// Removes this fleet's accounts that are no longer in `bento.toml`, and their key files:
/// those with the fleet's prefix, in the fleet's group, and (see `not_ours`) marked as bento's
/// with their home the host's directory in *this* fleet's chroot, so another fleet sharing
/// the server and an overlapping prefix is never touched. Their published data stays,
/// locked to root.
fn prune_accounts(
    config: &FleetConfig,
    chroot: &Chroot,
    wanted: &BTreeSet<String>,
) -> Result<Vec<SyncReport>, SyncError> {
    let prefix = &config.server.account_prefix;
    let keys_dir = &config.server.authorized_keys_dir;
    let mut reports = Vec::new();
    let mut gone = BTreeSet::new();
    for account in system::account_names()? {
        let Some(rest) = account.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let in_group = system::groups_of(&account)?.contains(&config.server.group);
        if wanted.contains(&account) || !in_group {
            continue;
        }
        let Ok(host) = HostName::new(rest) else {
            continue;
        };
        let Some(info) = accounts::user(&account).map_err(io_err(Path::new("/etc/passwd")))? else {
            continue;
        };
        if not_ours(&info, &chroot.host_dir(&host), &config.server.group)?.is_some() {
            continue;
        }
        let result = remove_account(&info, &account, keys_dir);
        let host = Some(host);
        reports.push(SyncReport {
            host,
            account: account.clone(),
            action: match result {
                Ok(_) => SyncAction::Removed,
                Err(_) => SyncAction::Failed,
            },
            details: match result {
                Ok(details) => details,
                Err(e) => vec![e.to_string()],
            },
        });
        gone.insert(account);
    }
    // Key files left behind by accounts removed by hand: nobody can use them now, but a
    // future account of the same name would silently inherit the key.
    if let Ok(entries) = fs::read_dir(keys_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix.as_str())
                && !wanted.contains(&name)
                && !gone.contains(&name)
                && accounts::user(&name).ok().flatten().is_none()
            {
                let path = entry.path();
                fs::remove_file(&path).map_err(io_err(&path))?;
                reports.push(SyncReport {
                    host: name
                        .strip_prefix(prefix.as_str())
                        .and_then(|h| HostName::new(h).ok()),
                    account: name,
                    action: SyncAction::Removed,
                    details: vec![format!("stale key file {} removed", path.display())],
                });
            }
        }
    }
    Ok(reports)
}

fn remove_account(
    info: &accounts::Account,
    account: &str,
    keys_dir: &Path,
) -> Result<Vec<String>, SyncError> {
    let mut details = Vec::new();
    let key_file = keys_dir.join(account);
    // The key goes first: even if userdel fails below, the host can no longer log in.
    match fs::remove_file(&key_file) {
        Ok(()) => details.push(format!("key file {} removed", key_file.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&key_file)(e)),
    }
    // Once the account and its group are deleted their ids may be reused by a new account,
    // which would then read this host's secrets: the jail goes to root alone first, whatever
    // group it had.
    let dir = Path::new(&info.home);
    if let Some(sealed) = chroot::seal_host_dir(dir)? {
        details.push(sealed);
    }
    system::run("userdel", &[account])?;
    details.insert(0, "account deleted".to_owned());
    Ok(details)
}
