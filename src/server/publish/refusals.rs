//! Why a host is not published, in the words an operator acts on: a missing account or
//! `[hosts.NAME]`, a directory that did not list its hosts, a private key in a configuration
//! tree. Each message names the host, the file or directory at fault, and the fix.

use std::path::Path;

use super::{HostPlan, PublishError};
use crate::server::chroot::ChrootError;
use crate::server::fleet::HostName;
use crate::server::store::StoreError;

/// A host's failure; a missing account of a host bento.toml does not list says what helps
/// (sync-accounts only makes accounts for `[hosts.NAME]` entries).
pub(super) fn host_error(
    config: &crate::server::fleet::FleetConfig,
    host: &HostName,
    e: PublishError,
) -> String {
    match e {
        PublishError::Chroot(ChrootError::NoAccount(account))
        | PublishError::Store(StoreError::Chroot(ChrootError::NoAccount(account)))
            if !config.hosts.contains_key(host) =>
        {
            format!(
                "account {account} does not exist, and bento.toml has no [hosts.{host}], so `bento server sync-accounts` would not create it: add [hosts.{host}] with key = \"<the host's ssh public key>\" to bento.toml, then run `bento server sync-accounts` (or deploy the generated NixOS module)"
            )
        }
        e => e.to_string(),
    }
}

/// What publish says about a host whose directory has no `[hosts.NAME]` in bento.toml.
pub(super) fn no_entry_warning(host: &HostName, dir: Option<&Path>) -> String {
    let dir = dir.map_or_else(|| format!("hosts/{host}"), |d| d.display().to_string());
    format!(
        "{dir} defines host {host}, which has no [hosts.{host}] in bento.toml: add one with its key, or `bento server sync-accounts` will not manage (and --prune removes) its account"
    )
}

/// The broken directories, for messages: `hosts/a` or `hosts/a, hosts/b`.
fn broken_dirs(broken: &[crate::server::fleet::BrokenDir]) -> String {
    broken
        .iter()
        .map(|b| b.dir.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a `[hosts.NAME]` without a directory is not published (or built).
pub fn undefined_error(host: &HostName, broken: &[crate::server::fleet::BrokenDir]) -> String {
    if broken.is_empty() {
        crate::server::fleet::undefined_message(host)
    } else {
        format!(
            "{} did not list its hosts (see above), and no other directory defines {host}",
            broken_dirs(broken)
        )
    }
}

pub(super) fn unknown_host(
    host: HostName,
    broken: &[crate::server::fleet::BrokenDir],
) -> PublishError {
    if broken.is_empty() {
        PublishError::UnknownHost(host)
    } else {
        PublishError::UnknownHostBroken {
            host,
            broken: broken
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

/// Refuses a host whose configuration tree (not `files/`) holds a private key: the tree is
/// copied into the world-readable Nix store, on the hosts and wherever it is built. `dir` is
/// the host's directory in the fleet repo, for the message.
pub(super) fn refuse_private_keys(
    scanner: &crate::server::snapshot::Scanner,
    plan: &HostPlan,
    dir: &Path,
) -> Result<(), PublishError> {
    for entry in &plan.manifest.config {
        if let crate::protocol::manifest::ConfigEntry::File { path, sha256, .. } = entry {
            if scanner.holds_private_key(sha256) {
                return Err(PublishError::PrivateKeyInConfig(dir.join(path.as_str())));
            }
        }
    }
    Ok(())
}
