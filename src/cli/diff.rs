//! `bento diff`: per host, what changes between the system it runs (from its heartbeat) and
//! the one the working tree builds to (`--published`: the live manifest's or `bento build`'s): packages added, removed and
//! changed, and closure sizes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use crate::nix::closure::{self, ChangeKind, ClosureDiff, ClosureError};
use crate::nix::{Nix, StorePath};
use crate::server::fleet::{HostName, DEFAULT_INTERVAL};
use crate::server::status::{self, HostStatus, Query};
use crate::sys::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this host (repeatable)
    #[arg(long = "host", value_name = "NAME", value_parser = super::select::parse_host)]
    hosts: Vec<HostName>,
    // rollout (#13): --on selectors (cli/select.rs).
    #[command(flatten)]
    on: super::select::OnArgs,
    /// The chroot root (default: [server] chroot in bento.toml, else /srv/bento)
    #[arg(long, value_name = "DIR")]
    chroot: Option<PathBuf>,
    /// Compare with the published version's expected system instead of the working tree's
    #[arg(long)]
    published: bool,
}

pub fn run(fleet: Option<PathBuf>, mut args: Args) -> anyhow::Result<ExitCode> {
    let fleet = super::load_fleet(fleet)?;
    let chroot = super::select::chroot_of(&fleet, args.chroot)?;
    // rollout (#13): --on adds the hosts it selects (cli/select.rs).
    args.hosts = super::select::known(&fleet, &chroot, &args.hosts, &args.on.on)?;
    let intervals = super::status::intervals(&fleet);
    let mut rows = status::collect(&Query {
        chroot: &chroot,
        intervals: &intervals,
        default_interval: fleet.config.defaults.interval.unwrap_or(DEFAULT_INTERVAL),
        only: &args.hosts,
        now: SystemTime::now(),
    })?;
    for name in &args.hosts {
        if !rows.iter().any(|r| &r.host == name) {
            anyhow::bail!("no host named {name}: not in bento.toml and nothing published for it");
        }
    }
    rows.sort_by(|a, b| a.host.cmp(&b.host));
    let nix = Nix::default();
    // Issue #12: by default, what the working tree builds to (server::preview); hosts not in
    // the working tree keep their published expectation.
    let tree = if args.published {
        Default::default()
    } else {
        crate::server::preview::working_tree(&fleet, &chroot, &nix, &args.hosts)?
    };
    let nvd = closure::find_nvd();
    let mut failed = 0;
    for (i, row) in rows.iter_mut().enumerate() {
        if i > 0 {
            output::line("");
        }
        use crate::server::preview::TreeSystem;
        match tree.get(&row.host) {
            Some(TreeSystem::Built(s)) => row.expected_system = Some(s.clone()),
            Some(TreeSystem::NotBuilt(s)) => {
                output::line(&format!(
                    "{}: the working tree's system {s} is not built (run `bento build`)",
                    row.host
                ));
                failed += 1;
                continue;
            }
            Some(TreeSystem::Fails(e)) => {
                output::line(&format!(
                    "{}: the working tree does not evaluate: {e}",
                    row.host
                ));
                failed += 1;
                continue;
            }
            None => {}
        }
        if !show_host(&nix, nvd.as_deref(), row) {
            failed += 1;
        }
    }
    Ok(if failed > 0 {
        ExitCode::from(super::EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints one host's diff; false when it could not be computed.
fn show_host(nix: &Nix, nvd: Option<&std::path::Path>, row: &HostStatus) -> bool {
    let host = &row.host;
    let Some(running) = &row.running_system else {
        output::line(&format!(
            "{host}: has never reported its running system; nothing to compare"
        ));
        return true;
    };
    let Some(expected) = &row.expected_system else {
        output::line(&format!(
            "{host}: no expected system for its published version (run `bento build` or `bento publish --build`)"
        ));
        return true;
    };
    let Ok(running) = StorePath::new(running) else {
        output::line(&format!(
            "{host}: reports a running system that is not a store path: {running:?}"
        ));
        return false;
    };
    if &running == expected {
        output::line(&format!(
            "{host}: runs the expected system {}; nothing changes",
            expected.short_hash(8)
        ));
        return true;
    }
    output::line(&format!(
        "{host}: {} (running) → {} (expected)",
        running.short_hash(8),
        expected.short_hash(8)
    ));
    match closure::diff(nix, nvd, &running, expected) {
        Ok(diff) => {
            print_diff(&diff);
            true
        }
        Err(ClosureError::NotInStore(path)) => {
            let which = if path == running {
                "its running system"
            } else {
                "the expected system"
            };
            output::line(&format!(
                "  {which} {path} is not in this server's Nix store{}",
                if path == running {
                    " (copy it from the host with `nix copy --from`, or build the version it runs)"
                } else {
                    " (run `bento build`)"
                }
            ));
            false
        }
        Err(e) => {
            output::line(&format!(
                "  cannot compare: {}",
                e.to_string().lines().next().unwrap_or("")
            ));
            tracing::error!("{host}: {e}");
            false
        }
    }
}

fn print_diff(diff: &ClosureDiff) {
    if let Some(text) = &diff.text {
        for l in text.lines() {
            output::line(&format!("  {l}"));
        }
    }
    let width = diff.changes.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in &diff.changes {
        let versions = |v: &[String]| {
            if v.is_empty() {
                "∅".to_owned()
            } else {
                v.join(", ")
            }
        };
        let what = match c.kind {
            ChangeKind::Added => format!("added    {:width$}  {}", c.name, versions(&c.after)),
            ChangeKind::Removed => format!("removed  {:width$}  {}", c.name, versions(&c.before)),
            ChangeKind::Changed => format!(
                "changed  {:width$}  {} → {}",
                c.name,
                versions(&c.before),
                versions(&c.after)
            ),
        };
        match &c.size_delta {
            Some(d) => output::line(&format!("  {what}  {d}")),
            None => output::line(&format!("  {what}")),
        }
    }
    if diff.text.is_none() && diff.changes.is_empty() {
        output::line("  no package changes");
    }
    if let (Some(b), Some(a)) = (diff.size_before, diff.size_after) {
        let delta = a as i128 - b as i128;
        let sign = if delta < 0 { "-" } else { "+" };
        output::line(&format!(
            "  closure size: {} → {} ({sign}{})",
            output::bytes(b),
            output::bytes(a),
            output::bytes(delta.unsigned_abs() as u64)
        ));
    }
}
