//! `bento journal [--json]`: the publisher's journal (`server::records::Journal`), oldest
//! entry first, one line per host of each entry.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::server::records::Journal;
use crate::sys::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the entries as one JSON array on stdout
    #[arg(long)]
    json: bool,
    /// The chroot root (default: [server] chroot in bento.toml, else /srv/bento)
    #[arg(long, value_name = "DIR")]
    chroot: Option<PathBuf>,
}

pub fn run(fleet: Option<PathBuf>, args: Args) -> anyhow::Result<ExitCode> {
    let fleet = super::load_fleet(fleet)?;
    let chroot = super::select::chroot_of(&fleet, args.chroot)?;
    let journal = Journal::new(&crate::server::records::dir(&chroot));
    let (entries, bad) = journal
        .read()
        .with_context(|| format!("reading {}", journal.path().display()))?;
    if bad > 0 {
        output::warning(&format!(
            "{}: {bad} line(s) unreadable, skipped",
            journal.path().display()
        ));
    }
    if args.json {
        output::json(&entries)?;
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() {
        output::note("the journal is empty: nothing was published or rolled back yet");
    }
    for e in &entries {
        let commit = e
            .commit
            .as_deref()
            .map(|c| format!("  commit {}", &c[..c.len().min(12)]))
            .unwrap_or_default();
        output::line(&format!(
            "{}  {}  by {}{commit}",
            e.time,
            e.action,
            crate::sys::terminal::escape(&e.who)
        ));
        for h in &e.hosts {
            let version = h.version.map(|d| d.short()).unwrap_or_else(|| "-".into());
            let serial = h
                .serial
                .map(|s| format!("  serial {s}"))
                .unwrap_or_default();
            let detail = h
                .detail
                .as_deref()
                .map(|d| format!("  {}", crate::sys::terminal::escape(d)))
                .unwrap_or_default();
            output::line(&format!(
                "    {}  {}  {version}{serial}{detail}",
                h.host, h.result
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}
