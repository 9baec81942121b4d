//! `bento log HOST [-n N] [--json]`: a host's past runs from its `logs/reports/`;
//! `bento log HOST ID`: one run's full log.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::server::fleet::HostName;
use crate::server::history::{self, Run};
use crate::sys::{output, terminal};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The host whose runs to show
    #[arg(value_parser = super::select::parse_host)]
    host: HostName,
    /// Print this run's full log instead of the list (an ID from the list)
    id: Option<String>,
    /// How many runs to list, newest first
    #[arg(short = 'n', long = "count", value_name = "N", default_value_t = 20)]
    count: usize,
    /// The runs as a JSON array on stdout
    #[arg(long)]
    json: bool,
    /// The chroot root (default: [server] chroot in bento.toml, else /srv/bento)
    #[arg(long, value_name = "DIR")]
    chroot: Option<PathBuf>,
}

pub fn run(fleet: Option<PathBuf>, args: Args) -> anyhow::Result<ExitCode> {
    let fleet = super::load_fleet(fleet)?;
    let chroot = super::select::chroot_of(&fleet, args.chroot)?;
    let dir = chroot.host_dir(&args.host);
    let store = super::select::store_of(&fleet, &chroot)?;
    if !fleet.config.hosts.contains_key(&args.host) && !dir.is_dir() {
        anyhow::bail!(
            "no host named {}: not in bento.toml and nothing published for it in {}",
            args.host,
            chroot.root.display()
        );
    }
    if let Some(id) = args.id {
        let text = history::full_log(&*store, &args.host, &id)
            .with_context(|| format!("host {}", args.host))?;
        // Host-written text: shown, never interpreted by the terminal.
        for line in text.lines() {
            output::line(&terminal::escape(line));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let journal = crate::server::records::Journal::new(&crate::server::records::dir(&chroot));
    let rollbacks = crate::server::records::rolled_back(&journal, &args.host);
    let history::History { runs, unexpected } =
        history::history(&*store, &args.host, args.count, &rollbacks)
            .with_context(|| format!("host {}", args.host))?;
    // Names the host chose that are not runs: one escaped line each, never an ID.
    for name in &unexpected {
        output::warning(&format!(
            "{}: unexpected entry in logs/reports/: {name}",
            args.host
        ));
    }
    if args.json {
        output::json(&runs)?;
    } else if runs.is_empty() {
        output::note(&format!("{} has not reported any run yet", args.host));
    } else {
        for line in table(&runs) {
            output::line(&line);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn table(runs: &[Run]) -> Vec<String> {
    let rows: Vec<[String; 7]> = runs
        .iter()
        .map(|r| {
            let or_dash = |s: Option<String>| s.unwrap_or_else(|| "-".into());
            let outcome = match (&r.unreadable, r.outcome) {
                (Some(_), _) => "unreadable".to_owned(),
                (None, Some(_)) if r.same_system => "success (same system)".to_owned(),
                (None, Some(o)) => o.as_str().to_owned(),
                (None, None) => "-".to_owned(),
            };
            let error = r.unreadable.clone().or_else(|| r.error.clone());
            [
                r.id.clone(),
                or_dash(r.time.clone()),
                or_dash(r.kind.map(|k| k.as_str().to_owned())),
                outcome,
                or_dash(r.version.as_ref().map(|v| v.to_string()[..12].to_owned())),
                or_dash(
                    r.duration_ms
                        .map(|ms| format!("{:.1}s", ms as f64 / 1000.0)),
                ),
                or_dash(error.map(|e| terminal::escape(&e).into_owned())),
            ]
        })
        .collect();
    let head = [
        "ID", "STARTED", "KIND", "OUTCOME", "VERSION", "DURATION", "ERROR",
    ];
    let mut widths = head.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let fmt = |cells: [&str; 7]| {
        let mut line = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == cells.len() - 1 {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        line.trim_end().to_owned()
    };
    let mut out = vec![fmt(head)];
    out.extend(rows.iter().map(|r| fmt(r.each_ref().map(String::as_str))));
    out
}
