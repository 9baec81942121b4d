//! `bento status`: one row per host (table, `--json`, `--prometheus FILE`), `--watch` to
//! redraw on every publish or report. Exits 2 when a host is failing, rolled back, silent or stale,
//! so it can serve as a monitoring check, 3 when none is but one is drifted, and 1 when it
//! could not read what it reports on.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;

use crate::protocol::layout::Chroot;
use crate::server::fleet::{Fleet, HostName, DEFAULT_INTERVAL};
use crate::server::rollout::StatusView;
use crate::server::status::{self, render, watch::Watcher, HostStatus, Query};
use crate::sys::output;

/// Exit status when any host is failing, rolled back, silent or stale.
pub const EXIT_UNHEALTHY: u8 = super::exit::UNHEALTHY;
/// Exit status when no host is unhealthy but one is `drifted` (runs another system than the
/// one it applied): not an outage, but not the fleet the operator published either.
pub const EXIT_DRIFTED: u8 = super::exit::DRIFTED;
/// With `--watch`, ages and silence are refreshed at least this often without any change.
const WATCH_REFRESH: Duration = Duration::from_secs(30);

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
    /// Print a JSON array on stdout, one object per host; its `state` is one of up-to-date,
    /// update-pending, new, held, drifted, stale, silent, rolled-back, failing, unknown (stable
    /// names)
    #[arg(long)]
    json: bool,
    /// Redraw whenever a publish, build or host report lands (until interrupted)
    #[arg(long)]
    watch: bool,
    /// Also write a node-exporter textfile (per-host state, last seen, last success)
    #[arg(long, value_name = "FILE")]
    prometheus: Option<PathBuf>,
    /// Colour the table: auto (on a terminal), always, never
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    color: Color,
    /// Evaluate states at this time (RFC 3339) instead of now: for reproducible output
    #[arg(long, value_name = "TIME", hide = true, value_parser = parse_time)]
    now: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Color {
    Auto,
    Always,
    Never,
}

fn parse_time(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(s).map_err(|e| e.to_string())
}

/// Every host of bento.toml with its polling interval (shared with `bento diff`).
pub(super) fn intervals(fleet: &Fleet) -> BTreeMap<HostName, Duration> {
    fleet
        .config
        .hosts
        .keys()
        .map(|name| (name.clone(), fleet.config.interval(name)))
        .collect()
}

pub fn run(fleet: Option<PathBuf>, mut args: Args) -> anyhow::Result<ExitCode> {
    let fleet = super::load_fleet(fleet)?;
    let chroot = super::select::chroot_of(&fleet, args.chroot.clone())?;
    let intervals = intervals(&fleet);
    // rollout (#13): --on adds the hosts it selects (cli/select.rs).
    args.hosts = super::select::known(&fleet, &chroot, &args.hosts, &args.on.on)?;
    for name in &args.hosts {
        let known = intervals.contains_key(name) || chroot.host_dir(name).is_dir();
        if !known {
            anyhow::bail!(
                "no host named {name}: not in bento.toml and nothing published for it in {}",
                chroot.root.display()
            );
        }
    }
    let color = match args.color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => output::color_on(std::io::stdout().is_terminal()),
    };
    let store = super::select::store_of(&fleet, &chroot)?;
    let show = |now: SystemTime| -> anyhow::Result<(Vec<HostStatus>, StatusView)> {
        let query = Query {
            store: &*store,
            chroot: &chroot,
            intervals: &intervals,
            default_interval: fleet.config.defaults.interval.unwrap_or(DEFAULT_INTERVAL),
            only: &args.hosts,
            now,
        };
        let mut rows = status::collect(&query)
            .with_context(|| format!("reading {}", chroot.root.display()))?;
        // rollout (#13): held hosts, hosts a rollout holds back (server/rollout.rs). Read
        // once per table: its warning, if any, is said once.
        let view = view(&fleet, &chroot);
        view.apply(&mut rows);
        rolled_back(&chroot, &mut rows);
        if let Some(path) = &args.prometheus {
            crate::sys::atomic::write_file(path, render::prometheus(&rows).as_bytes(), 0o644)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok((rows, view))
    };

    if !args.watch {
        let now = args.now.unwrap_or_else(SystemTime::now);
        let (rows, view) = show(now)?;
        print(&rows, now, args.json, color, false, &view)?;
        tracing::info!("{}", render::summary(&rows));
        let code = exit_code(&rows);
        if let Some(problem) = unreadable(&rows, &chroot) {
            // The table said what it could; the exit status must not say all is well.
            // Only an unhealthy host says more than "could not read" (a drift does not).
            if code != ExitCode::from(EXIT_UNHEALTHY) {
                anyhow::bail!(problem);
            }
            eprintln!("error: {problem}");
        }
        return Ok(code);
    }

    let watcher = Watcher::start(&chroot)
        .with_context(|| format!("watching {} for changes", chroot.root.display()))?;
    let clear = color && !args.json;
    loop {
        let now = args.now.unwrap_or_else(SystemTime::now);
        let (rows, view) = show(now)?;
        if clear {
            // Home and clear the screen, then draw: the table replaces the previous one.
            write_stdout("\x1b[H\x1b[2J")?;
        }
        print(&rows, now, args.json, color, true, &view)?;
        if !clear && !args.json {
            // Piped: one table after another, separated by a blank line.
            write_stdout("\n")?;
        }
        watcher.wait(WATCH_REFRESH);
    }
}

/// The table or JSON; `stream` (with `--watch`) gives one compact JSON array per line.
fn print(
    rows: &[HostStatus],
    now: SystemTime,
    json: bool,
    color: bool,
    stream: bool,
    view: &StatusView,
) -> anyhow::Result<()> {
    // rollout (#13): the JSON rows carry `tags` and `held_back` (server/rollout.rs).
    if json && stream {
        write_stdout(&format!("{}\n", serde_json::to_string(&view.json(rows))?))
    } else if json {
        output::json_list(&view.json(rows))
    } else {
        write_stdout(&render::table(rows, now, color))
    }
}

/// Writes and flushes stdout; an error (the reader went away) ends `--watch`.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

// rollout (#13): the rollout's view of the fleet, read afresh for every redraw.
fn view(fleet: &Fleet, chroot: &Chroot) -> StatusView {
    let progress = crate::server::rollout::load(chroot).unwrap_or_else(|e| {
        tracing::warn!("{e}");
        None
    });
    crate::server::rollout::StatusView::new(&fleet.config, progress.as_ref())
}

/// Issue #24 item 3: a host rolled back from the server stays on that version until
/// released; its row says so, with the version it was rolled back from. Once it runs that
/// version its state is `rolled back` (not `up to date`): until someone releases it, the
/// fleet is not where the working tree says, and `bento status` exits 2 as for a host that
/// rolled itself back.
fn rolled_back(chroot: &Chroot, rows: &mut [HostStatus]) {
    let holds = crate::server::records::Holds::new(&crate::server::records::dir(chroot));
    // One listing, not a lookup per host; should it fail, each host's lookup says why.
    let held = holds.held().ok();
    for row in rows.iter_mut() {
        if held.as_ref().is_some_and(|h| !h.contains(&row.host)) {
            continue;
        }
        let hold = match holds.get(&row.host) {
            Ok(Some(h)) => h,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        let note = format!(
            "rolled back from {} (to the content of {}) by {} at {}; publish leaves it until `bento rollback --release {}`",
            hold.from.map_or_else(|| "-".into(), |d| d.short()),
            hold.to.short(),
            hold.by,
            hold.at,
            row.host
        );
        row.error = Some(match row.error.take() {
            Some(e) => format!("{note}; {e}"),
            None => note,
        });
        if row.state == status::State::UpToDate {
            row.state = status::State::RolledBack;
        }
    }
}

/// What to say when some hosts' files could not be read (their rows name the files).
fn unreadable(rows: &[HostStatus], chroot: &Chroot) -> Option<String> {
    let hosts: Vec<&str> = rows
        .iter()
        .filter(|r| r.unreadable)
        .map(|r| r.host.as_str())
        .collect();
    let (first, rest) = hosts.split_first()?;
    let which = match rest.len() {
        0 => format!("host {first}"),
        n => format!("{} hosts ({first} and {n} more)", hosts.len()),
    };
    Some(format!(
        "could not read the files of {which} in {}, so their state is not known: run bento status as a user that can read the chroot (root)",
        chroot.root.display()
    ))
}

fn exit_code(rows: &[HostStatus]) -> ExitCode {
    if rows.iter().any(|r| r.state.is_alarm()) {
        ExitCode::from(EXIT_UNHEALTHY)
    } else if rows.iter().any(|r| r.state == status::State::Drifted) {
        ExitCode::from(EXIT_DRIFTED)
    } else {
        ExitCode::SUCCESS
    }
}
