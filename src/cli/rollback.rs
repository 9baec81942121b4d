//! `bento rollback HOST…`: make a kept earlier version live again as a new version, so the
//! hosts go back without anyone logging in (`server::rollback`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde::Serialize;

use crate::server::fleet::HostName;
use crate::server::publish;
use crate::server::rollback::{self, RolledBack};
use crate::server::wait::{Finished, Tracker};
use crate::sys::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The hosts to roll back
    #[arg(value_name = "HOST", value_parser = super::select::parse_host)]
    hosts: Vec<HostName>,
    #[command(flatten)]
    on: super::select::OnArgs,
    /// The version to go back to (a prefix of its digest, as `bento status` and `bento log`
    /// show it; default: the newest kept version whose content differs from the live one)
    #[arg(long, value_name = "VERSION")]
    to: Option<String>,
    /// Then follow the hosts until they reported on the rolled-back version
    #[arg(long, value_name = "TIMEOUT", num_args = 0..=1, require_equals = true,
          default_missing_value = super::wait::DEFAULT_TIMEOUT, value_parser = super::wait::parse_timeout)]
    wait: Option<Duration>,
    /// Print a JSON summary on stdout
    #[arg(long)]
    json: bool,
    /// The chroot root (default: [server] chroot in bento.toml, else /srv/bento)
    #[arg(long, value_name = "DIR")]
    chroot: Option<PathBuf>,
    /// Release these hosts' rollback holds instead (the next `bento publish` publishes the
    /// working tree to them again); nothing is published now
    #[arg(long, conflicts_with_all = ["to", "wait"])]
    release: bool,
}

#[derive(Serialize)]
struct Summary<'a> {
    rolled_back: &'a [RolledBack],
    errors: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    hosts: Option<&'a [Finished]>,
}

pub fn run(fleet: Option<PathBuf>, args: Args) -> anyhow::Result<ExitCode> {
    let fleet = super::load_fleet(fleet)?;
    let chroot = super::select::chroot_of(&fleet, args.chroot.clone())?;
    let hosts = super::select::known(&fleet, &chroot, &args.hosts, &args.on.on)?;
    if hosts.is_empty() {
        anyhow::bail!("name the hosts to roll back (HOST… or --on SELECTOR)");
    }
    if args.to.is_some() && hosts.len() > 1 {
        anyhow::bail!(
            "--to names one host's version; roll back {} one at a time",
            super::wait::names(&hosts)
        );
    }
    let store = super::select::store_of(&fleet, &chroot)?;
    let lock_path = chroot.lock_path();
    // The publish lock: a rollback or a release never interleaves with a publish, which reads
    // and rewrites the same holds.
    let _lock = publish::open_store(&*store, || {
        output::note(&format!(
            "another publish holds {}; waiting",
            lock_path.display()
        ))
    })
    .with_context(|| format!("opening {}", chroot.root.display()))?;
    if args.release {
        return release(&chroot, &hosts, args.json);
    }
    let signer = publish::load_signer(&fleet)?;
    let now = SystemTime::now();
    let serials = crate::server::records::Serials::new(&crate::server::records::dir(&chroot));
    let numbering = publish::Numbering {
        signer: signer.as_ref(),
        record: Some(&serials),
        floor: None,
        dry_run: false,
        stamping: publish::freshness_window(&fleet.config, signer.as_ref())?
            .map(|window| publish::Stamping { window, now }),
        // Rare and per host: the kept versions are read.
        versions: None,
    };
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for host in &hosts {
        if crate::server::targets::held(&fleet.config).contains(host) {
            output::note(&format!(
                "{host} has hold = true: rolling it back anyway, as asked"
            ));
        }
        match rollback::rollback_host(&*store, host, args.to.as_deref(), now, &numbering) {
            Ok(r) => {
                if !args.json {
                    output::line(&format!(
                        "{host}  rolled back  {} → {} (the content of {}{})",
                        r.from.map_or_else(|| "-".into(), |d| d.short()),
                        r.version.short(),
                        r.to.short(),
                        r.system
                            .as_deref()
                            .map(|s| format!(", system {s}"))
                            .unwrap_or_default()
                    ));
                }
                hold(&chroot, &r)?;
                done.push(r);
            }
            Err(e) => {
                output::note(&format!("not rolled back: {e}"));
                errors.push(e.to_string());
            }
        }
    }
    journal(&chroot, &done)?;
    drop(_lock);

    let mut finished = None;
    if let Some(timeout) = args.wait {
        let rolled: Vec<HostName> = done.iter().map(|r| r.host.clone()).collect();
        let mut tracker = Tracker::new(super::wait::baselines(&fleet, &chroot, &rolled)?, false);
        super::wait::follow(&fleet, &chroot, &mut tracker, timeout, false, !args.json)?;
        super::wait::summary(&tracker.finished);
        finished = Some(tracker.finished);
    }
    if args.json {
        output::json(&Summary {
            rolled_back: &done,
            errors: &errors,
            hosts: finished.as_deref(),
        })?;
    }
    let ok = errors.is_empty() && finished.as_deref().is_none_or(super::wait::all_succeeded);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_ERROR)
    })
}

/// A rollback is the operator's decision: the host stays on it until released.
fn hold(chroot: &crate::protocol::layout::Chroot, r: &RolledBack) -> anyhow::Result<()> {
    let holds = crate::server::records::Holds::new(&crate::server::records::dir(chroot));
    holds
        .set(&crate::server::records::Hold {
            host: r.host.clone(),
            from: r.from,
            to: r.to,
            version: r.version,
            at: r.created.clone(),
            by: crate::server::records::operator(),
        })
        .with_context(|| format!("recording the rollback hold of {}", r.host))
}

fn journal(chroot: &crate::protocol::layout::Chroot, done: &[RolledBack]) -> anyhow::Result<()> {
    use crate::server::records::{Entry, Journal, JournalHost, Serials};
    let records = crate::server::records::dir(chroot);
    let serials = Serials::new(&records);
    let hosts: Vec<JournalHost> = done
        .iter()
        .map(|r| JournalHost {
            host: r.host.clone(),
            result: "rolled back".to_owned(),
            version: Some(r.version),
            serial: serials.get(&r.host).ok().flatten(),
            detail: Some(format!(
                "from {} to the content of {}; held until released",
                r.from.map_or_else(|| "-".into(), |d| d.short()),
                r.to.short()
            )),
        })
        .collect();
    if hosts.is_empty() {
        return Ok(());
    }
    Journal::new(&records)
        .append(&Entry {
            time: crate::protocol::Timestamp::seconds(SystemTime::now()).to_string(),
            who: crate::server::records::operator(),
            action: "rollback".to_owned(),
            commit: None,
            hosts,
        })
        .context("writing the journal")
}

#[derive(Serialize)]
struct Released {
    released: Vec<crate::server::records::Hold>,
    not_held: Vec<HostName>,
}

/// `bento rollback --release HOST…`: lifts the holds; the next publish moves the hosts on.
fn release(
    chroot: &crate::protocol::layout::Chroot,
    hosts: &[HostName],
    json: bool,
) -> anyhow::Result<ExitCode> {
    use crate::server::records::{Entry, Holds, Journal, JournalHost};
    let records = crate::server::records::dir(chroot);
    let holds = Holds::new(&records);
    let mut out = Released {
        released: Vec::new(),
        not_held: Vec::new(),
    };
    for host in hosts {
        match holds
            .release(host)
            .with_context(|| format!("releasing the rollback hold of {host}"))?
        {
            Some(h) => {
                if !json {
                    output::line(&format!(
                        "{host}  released  (rolled back by {} at {}; the next `bento publish` publishes the working tree to it)",
                        h.by, h.at
                    ));
                }
                out.released.push(h);
            }
            None => {
                if !json {
                    output::line(&format!("{host}  not held"));
                }
                out.not_held.push(host.clone());
            }
        }
    }
    if !out.released.is_empty() {
        Journal::new(&records)
            .append(&Entry {
                time: crate::protocol::Timestamp::seconds(SystemTime::now()).to_string(),
                who: crate::server::records::operator(),
                action: "release".to_owned(),
                commit: None,
                hosts: out
                    .released
                    .iter()
                    .map(|h| JournalHost {
                        host: h.host.clone(),
                        result: "released".to_owned(),
                        version: Some(h.version),
                        serial: None,
                        detail: None,
                    })
                    .collect(),
            })
            .context("writing the journal")?;
    }
    if json {
        output::json(&out)?;
    }
    Ok(ExitCode::SUCCESS)
}
