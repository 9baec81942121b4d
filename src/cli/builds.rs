//! Building hosts with progress on the terminal and a result line per host; shared by
//! `bento build` and `bento publish --build`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::Context as _;

use crate::nix::Nix;
use crate::protocol::layout::Chroot;
use crate::server::build::{self, HostBuild, Outcome};
use crate::server::fleet::{Fleet, HostName, NixFlakeHosts};
use crate::server::snapshot::{HashCache, Scanner};
use crate::sys::output;

/// Builds hosts with progress (a spinner per running build on a terminal) and, with
/// `lines`, one result line per host on stdout as each finishes. A flake directory whose
/// hosts cannot be listed is printed once on stderr (an error when `everything` was asked
/// for, else a warning); the result says how many there were.
pub fn build_hosts(
    fleet: &Fleet,
    chroot: &Chroot,
    only: &[HostName],
    dry: bool,
    jobs: usize,
    lines: bool,
    everything: bool,
) -> anyhow::Result<(Vec<HostBuild>, usize)> {
    let now = SystemTime::now();
    // The hash cache is only read: publish owns writing it, under its lock.
    let scanner = Scanner::new(
        fleet.root.clone(),
        HashCache::load(&chroot.hash_cache_path()),
        now,
    );
    let flakes = NixFlakeHosts::new(Nix::default(), Some(chroot.flake_cache_path()));
    let terminal = output::shows_progress();
    let multi = indicatif::MultiProgress::new();
    if !terminal {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let bars: Mutex<HashMap<HostName, indicatif::ProgressBar>> = Mutex::default();
    let width = 12;
    let on_start = |host: &HostName| {
        let bar = multi.add(indicatif::ProgressBar::new_spinner());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .expect("valid template"),
        );
        bar.set_message(format!(
            "{} {host}",
            if dry { "evaluating" } else { "building" }
        ));
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bars.lock().expect("lock").insert(host.clone(), bar);
    };
    let on_done = |r: &HostBuild| {
        if let Some(bar) = bars.lock().expect("lock").remove(&r.host) {
            bar.finish_and_clear();
            multi.remove(&bar);
        }
        if lines {
            multi.suspend(|| output::line(&format_line(r, width)));
        }
    };
    let results = build::run(
        fleet,
        &flakes,
        &scanner,
        &Nix::default(),
        &build::Options {
            chroot: chroot.clone(),
            only: only.to_vec(),
            dry,
            jobs,
            now,
            on_start: &on_start,
            on_done: &on_done,
        },
    )
    .with_context(|| format!("building {}", fleet.root.display()))?;
    for b in &results.broken {
        let what = if everything { "error" } else { "warning" };
        eprintln!("{what}: {b}; none of its hosts is built");
        print_log_tail(b);
    }
    Ok((results.hosts, results.broken.len()))
}

/// `alpha  built  /nix/store/…`, or `alpha  failed  error: …` followed by the log tail.
pub fn format_line(r: &HostBuild, width: usize) -> String {
    let host = r.host.as_str();
    match r.outcome {
        Outcome::Built | Outcome::Evaluated => {
            let word = if r.outcome == Outcome::Built {
                "built"
            } else {
                "evaluated"
            };
            let system = r.system.as_ref().map_or("-", |s| s.as_str());
            match &r.drv {
                Some(drv) => format!("{host:width$}  {word:9}  {system}  ({drv})"),
                None => format!("{host:width$}  {word:9}  {system}"),
            }
        }
        Outcome::Failed => {
            let mut text = format!(
                "{host:width$}  {:9}  {}",
                "failed",
                r.error.as_deref().unwrap_or("failed")
            );
            for l in r.log_tail.iter().flat_map(|t| t.lines()) {
                text.push_str("\n    ");
                text.push_str(l);
            }
            text
        }
    }
}

/// The code excerpt below Nix's error, without the error line the summary already said.
pub fn print_log_tail(b: &crate::server::fleet::BrokenDir) {
    for line in b
        .log_tail
        .lines()
        .filter(|l| !l.trim().is_empty() && !b.message.contains(l.trim()))
    {
        eprintln!("    {line}");
    }
}
