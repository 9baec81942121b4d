//! `bento server check`: reads the live system (accounts, key files, chroot directories and
//! sshd's effective configuration per account) and says, host by host, what is wrong. It
//! changes nothing.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::protocol::layout::{Chroot, BACKUPS, LOGS, MANIFESTS, OBJECTS};
use crate::server::chroot::{owner_mode_problem, unsafe_component};
use crate::server::fleet::{FleetConfig, HostName};
use crate::sys::accounts;

use super::keys::{fleet_keys, keys_in_authorized_file, PublicKey};
use super::sshd::{check_server_paths, effective_problems, parse_effective};
use super::system;

/// Where to find sshd and its configuration.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub sshd: PathBuf,
    pub sshd_config: PathBuf,
    /// The disk use above which a host's writable directories are flagged (bytes).
    pub logs_limit: u64,
}

/// Problems of one host (empty = fine).
#[derive(Debug, Clone, Serialize)]
pub struct HostCheck {
    pub host: HostName,
    pub account: String,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// Problems shared by every host (chroot root, key directory, group and who else is in it).
    pub server: Vec<String>,
    pub hosts: Vec<HostCheck>,
    /// Not wrong, but weaker than it should be (unsigned manifests); no effect on the exit
    /// status.
    pub warnings: Vec<String>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.server.is_empty() && self.hosts.iter().all(|h| h.problems.is_empty())
    }
}

/// Checks the live server against `bento.toml`.
pub fn check(config: &FleetConfig, opts: &CheckOptions) -> CheckReport {
    let server = &config.server;
    let mut shared = Vec::new();
    if let Err(e) = check_server_paths(server) {
        shared.push(e.to_string());
    }
    for (what, dir) in [
        ("chroot", &server.chroot),
        ("authorized_keys_dir", &server.authorized_keys_dir),
    ] {
        match unsafe_component(dir) {
            Ok(Some((path, problem))) => {
                shared.push(format!("{what}: {} is {problem}", path.display()))
            }
            Ok(None) if !dir.is_dir() => {
                shared.push(format!("{what}: {} does not exist", dir.display()))
            }
            Ok(None) => {}
            Err(e) => shared.push(format!("{what}: {}: {e}", dir.display())),
        }
    }
    if let Ok(meta) = fs::metadata(&server.authorized_keys_dir) {
        if meta.mode() & 0o055 != 0o055 {
            shared.push(format!(
                "authorized_keys_dir: {} (mode {:04o}) is not readable by the host accounts; sshd reads key files as the account",
                server.authorized_keys_dir.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    shared.extend(super::sshd_order::earlier_matches(
        &opts.sshd_config,
        &server.account_prefix,
        &server.group,
    ));
    let group = &server.group;
    match accounts::group(group) {
        Ok(Some(_)) => match super::group::problems(config) {
            Ok(found) => shared.extend(found),
            Err(e) => shared.push(e.to_string()),
        },
        Ok(None) => shared.push(format!("group {group} does not exist")),
        Err(e) => shared.push(format!("cannot look up group {group}: {e}")),
    }
    // Key problems are reported per host below; a fleet with a bad key still gets checked.
    let keys = fleet_keys(config);
    let chroot = Chroot::new(&server.chroot);
    let hosts = config
        .hosts
        .iter()
        .map(|(host, hc)| {
            let account = config.account(host).unwrap_or_default();
            let mut problems = Vec::new();
            let key = match &keys {
                Ok(keys) => keys.get(host).cloned().flatten(),
                Err(errors) => {
                    let mine = errors.0.iter().filter(|e| e.concerns(host));
                    problems.extend(mine.map(|e| e.to_string()));
                    hc.key
                        .as_deref()
                        .and_then(|k| PublicKey::parse(host, k).ok())
                }
            };
            if hc.key.is_none() {
                problems.push("no key in bento.toml: the host cannot log in".to_owned());
            }
            check_host(
                config,
                &chroot,
                opts,
                host,
                &account,
                key.as_ref(),
                &mut problems,
            );
            HostCheck {
                host: host.clone(),
                account,
                problems,
            }
        })
        .collect();
    CheckReport {
        server: shared,
        warnings: signing_warnings(
            config,
            &crate::server::store::ChrootStore::new(
                chroot.clone(),
                crate::server::chroot::Ownership::Leave,
            ),
        ),
        hosts,
    }
}

/// Unsigned manifests: hosts cannot tell a snapshot from the sysadmin from one planted by
/// whoever controls the server (docs/security.md).
fn signing_warnings(config: &FleetConfig, store: &dyn crate::server::store::Store) -> Vec<String> {
    let mut warnings = Vec::new();
    if config.server.signing_key.is_none() {
        warnings.push(
            "manifests are not signed: create a key with `bento keygen`, set [server] signing_key, and give hosts trusted_keys"
                .to_owned(),
        );
    }
    for host in config.hosts.keys() {
        let Ok(Some((bytes, _))) = store.current(host) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(digest) = crate::protocol::layout::parse_current(&text) {
            let signature = crate::protocol::layout::Key::Signature(digest);
            if !store.exists(host, &signature).unwrap_or(false) {
                warnings.push(format!(
                    "{host}: live version {} is unsigned",
                    digest.short()
                ));
            }
        }
    }
    warnings
}

fn check_host(
    config: &FleetConfig,
    chroot: &Chroot,
    opts: &CheckOptions,
    host: &HostName,
    account: &str,
    key: Option<&PublicKey>,
    problems: &mut Vec<String>,
) {
    let info = match accounts::user(account) {
        Ok(Some(info)) => info,
        Ok(None) => {
            problems.push(format!(
                "account {account} is missing (run `bento server sync-accounts`, or deploy the NixOS module)"
            ));
            return;
        }
        Err(e) => {
            problems.push(format!("cannot look up account {account}: {e}"));
            return;
        }
    };
    let host_dir = chroot.host_dir(host);
    if Path::new(&info.home) != host_dir {
        problems.push(format!(
            "account {account} has home {}, not its chroot {}",
            info.home,
            host_dir.display()
        ));
    }
    let group = &config.server.group;
    match system::groups_of(account) {
        Ok(groups) if groups.iter().any(|g| g == group) => {}
        Ok(_) => problems.push(format!("account {account} is not in group {group}")),
        Err(e) => problems.push(e.to_string()),
    }
    check_key_file(config, account, key, problems);
    check_chroot(&host_dir, &info, problems);
    let mut host_owned = vec![host_dir.join(LOGS)];
    if config.server.backups {
        host_owned.push(host_dir.join(BACKUPS));
    }
    for dir in host_owned {
        planted_files(&dir, problems);
        over_limit(&dir, opts.logs_limit, problems);
    }
    check_sshd(config, opts, account, &info.home, &host_dir, problems);
}

fn check_key_file(
    config: &FleetConfig,
    account: &str,
    key: Option<&PublicKey>,
    problems: &mut Vec<String>,
) {
    let path = config.server.authorized_keys_dir.join(account);
    let meta = match fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if key.is_some() {
                problems.push(format!("key file {} is missing", path.display()));
            }
            return;
        }
        Err(e) => {
            problems.push(format!("key file {}: {e}", path.display()));
            return;
        }
    };
    if !meta.is_file() {
        problems.push(format!("key file {} is not a regular file", path.display()));
        return;
    }
    if let Some(problem) = owner_mode_problem(&meta) {
        problems.push(format!("key file {} is {problem}", path.display()));
    }
    let Some(key) = key else {
        problems.push(format!(
            "key file {} exists but bento.toml has no key for this host",
            path.display()
        ));
        return;
    };
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            problems.push(format!("key file {}: {e}", path.display()));
            return;
        }
    };
    if keys_in_authorized_file(&text) != [key.key_only()] {
        problems.push(format!(
            "key in {} differs from bento.toml (run `bento server sync-accounts`)",
            path.display()
        ));
    }
}

fn check_chroot(host_dir: &Path, info: &accounts::Account, problems: &mut Vec<String>) {
    let shown = host_dir.display();
    let meta = match fs::symlink_metadata(host_dir) {
        Ok(m) => m,
        Err(e) => {
            problems.push(format!("chroot {shown}: {e}"));
            return;
        }
    };
    if !meta.is_dir() {
        problems.push(format!("chroot {shown} is not a directory"));
        return;
    }
    let mode = meta.mode() & 0o7777;
    if let Some(problem) = owner_mode_problem(&meta) {
        problems.push(format!("chroot {shown} is {problem}"));
    }
    if meta.gid() != info.gid {
        problems.push(format!(
            "chroot {shown} has group {}, not the account's group {} (mode 0750 root:<account>)",
            meta.gid(),
            info.gid
        ));
    }
    if mode & 0o007 != 0 {
        problems.push(format!(
            "chroot {shown} is open to others (mode {mode:04o}, want 0750)"
        ));
    }
    for sub in [MANIFESTS, OBJECTS] {
        let path = host_dir.join(sub);
        match fs::symlink_metadata(&path) {
            Ok(m) if !m.is_dir() => problems.push(format!("{} is not a directory", path.display())),
            Ok(m) => {
                if let Some(problem) = owner_mode_problem(&m) {
                    problems.push(format!("{} is {problem}", path.display()));
                }
            }
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    let logs = host_dir.join(LOGS);
    match fs::symlink_metadata(&logs) {
        Ok(m) if !m.is_dir() => problems.push(format!("{} is not a directory", logs.display())),
        Ok(m) => {
            if m.uid() != info.uid || m.mode() & 0o300 != 0o300 {
                problems.push(format!(
                    "{} is not writable by the account (owner uid {}, mode {:04o}; want {}:{} 0750)",
                    logs.display(),
                    m.uid(),
                    m.mode() & 0o7777,
                    info.name,
                    info.name
                ));
            }
            if m.mode() & 0o002 != 0 {
                problems.push(format!("{} is world-writable", logs.display()));
            }
        }
        Err(e) => problems.push(format!("{}: {e}", logs.display())),
    }
}

/// Problems reported per host-writable directory before the rest are only counted.
const PLANTED_SHOWN: usize = 10;

/// What a host planted in a directory it may write (`logs/`, `backups/`): setuid or setgid
/// files, anything world-writable, links (symbolic or hard) and non-regular files. None is
/// needed by an agent or a backup tool, and each is a tool for whoever else reads there.
/// Nothing is followed; the walk stays on the directory's own entries.
fn planted_files(dir: &Path, problems: &mut Vec<String>) {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let kind = meta.file_type();
            let mode = meta.mode() & 0o7777;
            let mut what = Vec::new();
            if kind.is_symlink() {
                what.push("a symbolic link".to_owned());
            } else if !kind.is_file() && !kind.is_dir() {
                what.push("not a regular file (device, FIFO or socket)".to_owned());
            } else if kind.is_file() && meta.nlink() > 1 {
                what.push(format!("a hard link ({} names)", meta.nlink()));
            }
            if !kind.is_symlink() {
                if mode & 0o4000 != 0 {
                    what.push("setuid".to_owned());
                }
                if mode & 0o2000 != 0 {
                    what.push("setgid".to_owned());
                }
                if mode & 0o002 != 0 {
                    what.push("world-writable".to_owned());
                }
            }
            if !what.is_empty() {
                found.push(format!(
                    "{} is {} (mode {mode:04o}): planted by the host? remove it",
                    path.display(),
                    what.join(", ")
                ));
            }
            if kind.is_dir() {
                pending.push(path);
            }
        }
    }
    found.sort();
    let more = found.len().saturating_sub(PLANTED_SHOWN);
    problems.extend(found.into_iter().take(PLANTED_SHOWN));
    if more > 0 {
        problems.push(format!("{}: {more} more such entries", dir.display()));
    }
}

/// Disk use of everything under `dir` (blocks actually allocated, so a sparse file counts
/// for what it takes), without following links.
fn disk_use(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = fs::symlink_metadata(entry.path()) else {
                continue;
            };
            total = total.saturating_add(meta.blocks().saturating_mul(512));
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    total
}

/// A host-writable directory that grew past `limit`: the host can fill the server's disk
/// (each upload is the host's own choice), and only a quota stops it (docs/server.md).
fn over_limit(dir: &Path, limit: u64, problems: &mut Vec<String>) {
    let used = disk_use(dir);
    if used > limit {
        problems.push(format!(
            "{} uses {} on disk, more than the limit of {} (--logs-limit): a host filling the server's disk? set a quota for its account (docs/server.md)",
            dir.display(),
            crate::sys::output::bytes(used),
            crate::sys::output::bytes(limit)
        ));
    }
}

fn check_sshd(
    config: &FleetConfig,
    opts: &CheckOptions,
    account: &str,
    home: &str,
    host_dir: &Path,
    problems: &mut Vec<String>,
) {
    let spec = format!("user={account},host=bento-check,addr=127.0.0.1");
    let sshd = opts.sshd.display().to_string();
    let args = [
        "-T".as_ref(),
        "-f".as_ref(),
        opts.sshd_config.as_os_str(),
        "-C".as_ref(),
        spec.as_ref(),
    ];
    let effective = match system::run::<&std::ffi::OsStr>(&sshd, &args) {
        Ok(text) => parse_effective(&text),
        Err(e) => {
            problems.push(format!("cannot read sshd's effective configuration: {e}"));
            return;
        }
    };
    problems.extend(effective_problems(
        &config.server,
        &effective,
        account,
        home,
        host_dir,
    ));
    if effective.get("usepam").map(String::as_str) == Some("no") {
        match system::shadow_password(account) {
            Ok(Some(p)) if p.starts_with('!') => problems.push(format!(
                "account {account} is locked (password field {p:?}); sshd with UsePAM no refuses it even for keys (`usermod -p '*' {account}`)"
            )),
            Ok(_) => {}
            Err(e) => problems.push(e.to_string()),
        }
    }
}
