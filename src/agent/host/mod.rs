//! The machine the agent manages, behind one seam: what runs and what booted, realising a
//! system, pointing the system profile, activating, rebooting, notifying a person,
//! re-locking flake inputs for a self-update, and answering health checks (failed units, a
//! unit's state, a command, an HTTP GET). [`NixHost`] is the real machine; the unit tier
//! drives every branch of an update through a fake that records what it was asked to do.
//!
//! Invariant: the update logic changes the machine only through this trait, so a run that
//! never calls `set_profile` or `activate` has provably left the running system alone.

mod activate;
mod nix;
mod probe;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use nix::NixHost;

use crate::nix::{Built, NixError, Target};
use crate::protocol::check::HttpUrl;
use crate::protocol::{Mode, StorePath};

#[derive(Debug, thiserror::Error)]
#[error("`{argv}` failed ({status}):\n{output_tail}")]
pub struct ActivateError {
    pub argv: String,
    pub status: String,
    pub output_tail: String,
    pub output: String,
}

/// How a system comes to be in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Realise {
    /// Evaluate and build a configuration tree (a flake host or a classic one).
    Build(Target),
    /// Import the closure the server built (the manifest's `system`) from the local file
    /// binary cache `cache`, without evaluating: exactly `paths` (the part of the closure
    /// the store lacks), each signed by one of `keys` (`cache_keys`, `name:base64`).
    Substitute {
        system: StorePath,
        cache: PathBuf,
        paths: Vec<StorePath>,
        keys: Vec<String>,
    },
}

pub trait Host {
    /// The running system, if one can be told.
    fn running(&self) -> std::io::Result<Option<StorePath>>;
    /// The system the machine booted, when it can be told.
    fn booted(&self) -> Option<StorePath>;
    /// True when `new` needs a reboot to run fully after `booted` (kernel, initrd or kernel
    /// modules differ).
    fn boot_files_differ(&self, booted: &StorePath, new: &StorePath) -> bool;
    /// The subset of `paths` the store holds (valid, with their closures).
    fn valid_paths(&self, paths: &[StorePath]) -> Result<BTreeSet<StorePath>, NixError>;
    /// Puts the system described by `how` into the store; changes nothing that runs.
    fn realise(&self, how: &Realise) -> Result<Built, NixError>;
    /// Makes `path` the system profile's current generation.
    fn set_profile(&self, path: &StorePath) -> Result<(), NixError>;
    /// Runs `path/bin/switch-to-configuration MODE`; returns its output.
    fn activate(&self, path: &StorePath, mode: Mode) -> Result<String, ActivateError>;
    /// Re-locks every input of the flake in `dir`; true when the lock file changed.
    fn relock(&self, dir: &Path) -> Result<bool, NixError>;
    /// Tells a person about a failure or rollback: runs `command` with the report on stdin
    /// (bounded in time; never fatal).
    fn notify(&self, command: &[String], report: &[u8]);
    /// Reboots now; `step` hears each command tried.
    fn reboot_now(&self, step: &mut dyn FnMut(&str));
    /// Asks for a reboot at the next `when` (a systemd calendar expression), replacing an
    /// earlier schedule.
    fn schedule_reboot(&self, when: &str);
    /// The units systemd lists as failed; `None` when systemd is not the service manager.
    fn failed_units(&self) -> Option<Result<BTreeSet<String>, String>>;
    /// What `systemctl is-active UNIT` says (`active`, `activating`, `failed`, …).
    fn unit_state(&self, unit: &str, timeout: Duration) -> Result<String, String>;
    /// Runs a check's command (bounded): its last line of output when it exits 0, how it
    /// ended otherwise.
    fn run_check_command(&self, argv: &[String], timeout: Duration) -> Result<String, String>;
    /// `GET url` (bounded): the response's status code, or why there was none.
    fn http_get(&self, url: &HttpUrl, timeout: Duration) -> Result<u16, String>;
}
