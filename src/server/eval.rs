//! The evaluation gate (issue #12): before a changed host goes live, its system derivation is
//! instantiated on a scratch copy of exactly what would be published (no build), and a host
//! that does not evaluate is held back. Nix's errors are rewritten to name the fleet repo's
//! files (`hosts/<dir>/configuration.nix:3:1`), not the scratch copy or its store copy; the
//! same mapping is applied to `bento build`'s failures.

use std::path::Path;

use crate::nix::locate::{first_location, summary, SourceMap};
use crate::nix::{Nix, NixError, StorePath, Target};
use crate::protocol::manifest::{Build, ConfigEntry};
use crate::server::hostfiles::Source;
use crate::server::publish::HostPlan;

/// Name of scratch directories made for evaluation.
const EVAL_PREFIX: &str = "bento-eval-";
/// Name of scratch directories `bento build` makes (`server::build`).
const BUILD_PREFIX: &str = "bento-build-";
/// Lines of Nix's output kept with an evaluation failure.
pub const EVAL_TAIL_LINES: usize = 12;

/// Why a host did not evaluate, with paths already mapped to the fleet repo.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EvalFailure {
    /// One line: Nix's `error:` line and, when it gave one, ` (at <fleet path>:<line>:<col>)`.
    pub message: String,
    /// The end of Nix's output.
    pub log_tail: String,
}

/// A map from the plan's configuration tree to the fleet repo: each file to the path it was
/// read from (symlinks resolved, relative to `fleet_root`); the generated settings to
/// `bento.toml`.
pub fn source_map(plan: &HostPlan, fleet_root: &Path) -> SourceMap {
    let files = plan.manifest.config.iter().filter_map(|e| match e {
        ConfigEntry::File { path, sha256, .. } => {
            let shown = match plan.sources.get(sha256)? {
                Source::File(p) => p
                    .strip_prefix(fleet_root)
                    .unwrap_or(p)
                    .to_string_lossy()
                    .into_owned(),
                Source::Bytes(_) | Source::Pack(_) => {
                    format!("{} (generated from bento.toml)", path.as_str())
                }
            };
            Some((path.as_str().to_owned(), shown))
        }
        ConfigEntry::Directory { .. } => None,
    });
    // A file Nix names that the tree does not list is shown under the host's directory.
    let base = plan
        .manifest
        .config
        .iter()
        .find_map(|e| match e {
            ConfigEntry::File { path, sha256, .. } if !path.as_str().contains('/') => {
                match plan.sources.get(sha256)? {
                    Source::File(p) => Some(p.strip_prefix(fleet_root).ok()?.parent()?.to_owned()),
                    Source::Bytes(_) | Source::Pack(_) => None,
                }
            }
            _ => None,
        })
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    SourceMap::new(files, &base)
}

/// One line for a failure: Nix's `error:` line plus the first location, both mapped.
fn summarize(map: &SourceMap, e: &NixError) -> EvalFailure {
    let log = map.rewrite(e.log());
    let fallback = map.rewrite(e.to_string().lines().next().unwrap_or_default());
    let message = summary(&log, &fallback);
    EvalFailure {
        message,
        log_tail: crate::nix::tail(&log, EVAL_TAIL_LINES),
    }
}

/// Instantiates the plan's system derivation on a scratch copy of its configuration tree
/// (secrets excluded, generated settings included: exactly what the host will evaluate).
/// Restricted (`Nix::restricted`): what a contributor wrote reads nothing outside its tree.
pub fn evaluate(nix: &Nix, plan: &HostPlan, fleet_root: &Path) -> Result<StorePath, EvalFailure> {
    let nix = nix.clone().restricted();
    on_scratch_copy(plan, fleet_root, |target| nix.derivation(target))
}

/// Builds the plan's system the same way (for `build_on = "server"` hosts).
pub fn build(nix: &Nix, plan: &HostPlan, fleet_root: &Path) -> Result<StorePath, EvalFailure> {
    let nix = nix.clone().restricted();
    on_scratch_copy(plan, fleet_root, |target| nix.build(target).map(|b| b.path))
}

fn on_scratch_copy(
    plan: &HostPlan,
    fleet_root: &Path,
    run: impl FnOnce(&Target) -> Result<StorePath, NixError>,
) -> Result<StorePath, EvalFailure> {
    let scratch_failure = |e: std::io::Error| EvalFailure {
        message: format!("cannot prepare a scratch copy of {}: {e}", plan.host),
        log_tail: String::new(),
    };
    let tmp = tempfile::Builder::new()
        .prefix(EVAL_PREFIX)
        .tempdir()
        .map_err(scratch_failure)?;
    crate::server::publish::materialize_config(plan, tmp.path()).map_err(scratch_failure)?;
    let target = match plan.manifest.build {
        Build::Flake => Target::Flake {
            dir: tmp.path().to_owned(),
            host: plan.host.to_string(),
        },
        Build::Classic => Target::Classic {
            dir: tmp.path().to_owned(),
        },
    };
    run(&target).map_err(|e| summarize(&source_map(plan, fleet_root).with_root(tmp.path()), &e))
}

/// Rewrites a failed `bento build` result's error and log tail to name the fleet repo's files
/// (`error`, `log_tail` of `server::build::HostBuild`).
pub fn locate_build_failure(
    error: &mut Option<String>,
    log_tail: &mut Option<String>,
    plan: &HostPlan,
    fleet_root: &Path,
) {
    let map = source_map(plan, fleet_root)
        .with_scratch_prefix(&std::env::temp_dir().join(BUILD_PREFIX))
        .with_scratch_prefix(&std::env::temp_dir().join(EVAL_PREFIX));
    let log = log_tail.as_deref().map(|t| map.rewrite(t));
    if let Some(e) = error.as_mut() {
        let mut mapped = map.rewrite(e);
        if let Some(at) = log.as_deref().and_then(first_location) {
            if !mapped.contains(&at) {
                mapped = format!("{mapped} (at {at})");
            }
        }
        *e = mapped;
    }
    *log_tail = log;
}
