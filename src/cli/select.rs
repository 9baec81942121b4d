//! Choosing what a command works on: a host named on the command line, the chroot (the
//! flag or bento.toml's), how many jobs at once.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::protocol::layout::Chroot;
use crate::server::fleet::{Fleet, HostName};

/// clap's value parser for `--host NAME`.
pub fn parse_host(s: &str) -> Result<HostName, String> {
    HostName::new(s).map_err(|e| e.to_string())
}

/// Builds (or other parallel work) at once by default: the number of cores.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// The chroot root: `--chroot DIR`, else `[server] chroot` of bento.toml, made absolute.
pub fn chroot_of(fleet: &Fleet, chroot: Option<PathBuf>) -> anyhow::Result<Chroot> {
    let root = chroot.unwrap_or_else(|| fleet.config.server.chroot.clone());
    let root = std::path::absolute(&root).with_context(|| format!("chroot {}", root.display()))?;
    Ok(Chroot::new(root))
}
