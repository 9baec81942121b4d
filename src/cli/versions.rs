//! `bento versions HOST [--json]`: the host's kept versions, newest first, each with its
//! serial, digest, creation time, commit and what happened to it (from the live `current`,
//! the rollback hold and the journal).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use serde::Serialize;

use crate::protocol::manifest::Digest;
use crate::server::fleet::HostName;
use crate::server::records::{Holds, Journal};
use crate::sys::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The host
    #[arg(value_name = "HOST", value_parser = super::select::parse_host)]
    host: HostName,
    /// Print the versions as one JSON array on stdout
    #[arg(long)]
    json: bool,
    /// The chroot root (default: [server] chroot in bento.toml, else /srv/bento)
    #[arg(long, value_name = "DIR")]
    chroot: Option<PathBuf>,
}

#[derive(Serialize)]
struct Version {
    serial: u64,
    digest: Digest,
    created: String,
    commit: Option<String>,
    live: bool,
    /// What happened to it, oldest first (`published by root at …`, `rolled back to`, …).
    history: Vec<String>,
}

pub fn run(fleet: Option<PathBuf>, args: Args) -> anyhow::Result<ExitCode> {
    let fleet = super::load_fleet(fleet)?;
    let chroot = super::select::chroot_of(&fleet, args.chroot)?;
    let store = super::select::store_of(&fleet, &chroot)?;
    let kept = crate::server::rollback::kept_versions(&*store, &args.host)?;
    let records = crate::server::records::dir(&chroot);
    let (entries, _) = Journal::new(&records)
        .read()
        .with_context(|| format!("reading the journal in {}", records.display()))?;
    let hold = Holds::new(&records).get(&args.host)?;
    let versions: Vec<Version> = kept
        .iter()
        .map(|k| {
            let mut history: Vec<String> = entries
                .iter()
                .flat_map(|e| {
                    e.hosts
                        .iter()
                        .filter(|h| h.host == args.host && h.version == Some(k.digest))
                        .map(move |h| {
                            format!("{} ({} by {} at {})", h.result, e.action, e.who, e.time)
                        })
                })
                .collect();
            if let Some(h) = hold.as_ref() {
                if h.version == k.digest {
                    history.push(format!(
                        "held: the rollback's version, until `bento rollback --release {}`",
                        args.host
                    ));
                }
                if h.from == Some(k.digest) {
                    history.push("rolled back from".to_owned());
                }
                if h.to == k.digest {
                    history.push("rolled back to (its content is live again)".to_owned());
                }
            }
            if !k.live && history.is_empty() {
                history.push("superseded".to_owned());
            }
            Version {
                serial: k.manifest.serial,
                digest: k.digest,
                created: k.manifest.created.to_string(),
                commit: k.manifest.source_commit.clone(),
                live: k.live,
                history,
            }
        })
        .collect();
    if args.json {
        output::json(&versions)?;
        return Ok(ExitCode::SUCCESS);
    }
    for v in &versions {
        let commit = v
            .commit
            .as_deref()
            .map(|c| &c[..c.len().min(12)])
            .unwrap_or("-");
        output::line(&format!(
            "{:>6}  {}  {}  {commit}  {}{}",
            v.serial,
            v.digest.short(),
            v.created,
            if v.live { "live; " } else { "" },
            crate::sys::terminal::escape(&v.history.join("; "))
        ));
    }
    Ok(ExitCode::SUCCESS)
}
