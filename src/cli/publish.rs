//! `bento publish`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;

use crate::nix::Nix;
use crate::protocol::layout::Chroot;
use crate::server::fleet::{Fleet, HostName, NixFlakeHosts};
use crate::server::publish::{self, HostReport, Status};
use crate::server::snapshot::{HashCache, Scanner};
use crate::sys::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Publish only this host (repeatable)
    #[arg(long = "host", value_name = "NAME", value_parser = super::select::parse_host)]
    pub(super) hosts: Vec<HostName>,
    // rollout (#13): --on selectors and --wait (cli/select.rs, cli/wait.rs).
    #[command(flatten)]
    pub(super) on: super::select::OnArgs,
    /// Then follow the published hosts until each reported on its newest version (exit 0
    /// only if all succeeded)
    #[arg(long, value_name = "TIMEOUT", num_args = 0..=1, require_equals = true,
          default_missing_value = super::wait::DEFAULT_TIMEOUT, value_parser = super::wait::parse_timeout)]
    pub(super) wait: Option<std::time::Duration>,
    /// The chroot root (default: [server] chroot in bento.toml, else /srv/bento)
    #[arg(long, value_name = "DIR")]
    pub(super) chroot: Option<PathBuf>,
    /// Print a JSON summary on stdout
    #[arg(long)]
    pub(super) json: bool,
    /// Build each host's system first and record it in the manifest as the expected system;
    /// hosts whose build fails are not published
    #[arg(long)]
    pub(super) build: bool,
    /// With --build: builds at once (default: the number of cores)
    #[arg(long, short = 'j', value_name = "N", requires = "build", value_parser = clap::value_parser!(u16).range(1..))]
    pub(super) jobs: Option<u16>,
    /// Skip the evaluation gate: publish hosts whose configuration does not evaluate
    #[arg(long)]
    pub(super) no_eval: bool,
    /// Number new versions from serial N at least, even with the same content (when the
    /// server lost every record of the serials its hosts applied: docs/operators.md)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) serial_floor: Option<u64>,
    /// Print which hosts would get a new version and why (files, settings, configuration,
    /// system changed; unchanged (same system); held), and write nothing
    #[arg(long, conflicts_with_all = ["build", "wait", "export", "refresh"])]
    pub(super) dry_run: bool,
    /// Then copy the live trees of the published hosts (all hosts, or those of --host) into
    /// DIR/<host>/ for a mirror, `current` last (docs/mirrors.md)
    #[arg(long, value_name = "DIR")]
    pub(super) export: Option<PathBuf>,
    /// Only re-sign the freshness stamps of the hosts' live versions ([server] freshness):
    /// no new version, no serial; for an hourly timer
    #[arg(long, conflicts_with_all = ["build", "wait", "serial_floor", "no_eval", "on", "export"])]
    pub(super) refresh: bool,
}

pub fn run(fleet: Option<PathBuf>, mut args: Args) -> anyhow::Result<ExitCode> {
    let fleet = super::load_fleet(fleet)?;
    // A flake directory that cannot list its hosts fails the run when every host was asked
    // for; with named hosts it only matters if it hides one of them.
    let everything = args.hosts.is_empty() && args.on.on.is_empty();
    // With `[server] store = "s3://…"`, the publisher's state (`[server] state`): the same
    // index, serials, journal and lock as rollback, rollout and status use.
    let chroot = super::select::chroot_of(&fleet, args.chroot.take())?;
    if args.refresh {
        return refresh(&fleet, &chroot, &args.hosts, args.json);
    }
    // rollout (#13): --on narrows the hosts, hold = true leaves hosts out (cli/select.rs).
    match super::select::publishable(&fleet, &chroot, &args.hosts, &args.on.on)? {
        Some(hosts) => args.hosts = hosts,
        None => {
            output::note("every selected host is held: nothing published");
            return Ok(ExitCode::SUCCESS);
        }
    }
    if !crate::sys::accounts::is_root() {
        output::note("not running as root: directory owners in the chroot are left alone");
    }

    // --build: build first; only hosts that built are published, each with its system.
    let mut only = args.hosts.clone();
    let mut systems = std::collections::BTreeMap::new();
    let mut build_failed = 0;
    let mut not_built = Vec::new();
    let mut broken_before = 0;
    if args.build {
        let jobs = args
            .jobs
            .map(usize::from)
            .unwrap_or_else(super::select::default_jobs);
        // The build names a broken flake directory; publish below would name it again.
        let (built, broken) = super::builds::build_hosts(
            &fleet,
            &chroot,
            &args.hosts,
            false,
            jobs,
            false,
            everything,
        )?;
        broken_before = broken;
        for b in &built {
            match &b.system {
                Some(system) if b.outcome == crate::server::build::Outcome::Built => {
                    systems.insert(b.host.clone(), system.clone());
                }
                _ => {
                    build_failed += 1;
                    not_built.push(crate::server::delivery::not_built(
                        &*super::select::store_of(&fleet, &chroot)?,
                        b,
                    ));
                    output::note(&format!(
                        "not publishing {}: its build failed: {}",
                        b.host,
                        b.error.as_deref().unwrap_or("no error message")
                    ));
                    for line in b.log_tail.iter().flat_map(|t| t.lines()) {
                        eprintln!("    {line}");
                    }
                }
            }
        }
        if build_failed > 0 {
            only = systems.keys().cloned().collect();
            if only.is_empty() {
                anyhow::bail!("no host built; nothing published");
            }
        }
    }

    let bar = output::progress(0, "publishing");
    let on_host = |r: &HostReport| {
        bar.inc(1);
        bar.set_message(r.host.to_string());
    };
    let published = publish_tree(
        &fleet,
        &chroot,
        Tree {
            only,
            systems,
            eval: !args.no_eval,
            jobs: args
                .jobs
                .map(usize::from)
                .unwrap_or_else(super::select::default_jobs),
            on_host: &on_host,
            serial_floor: args.serial_floor,
            action: "publish",
            release: &args.hosts,
            dry_run: false,
        },
    )?;
    bar.finish_and_clear();
    let broken = published.broken.len();
    for b in published.broken.iter().filter(|_| broken_before == 0) {
        let what = if everything { "error" } else { "warning" };
        eprintln!("{what}: {b}; none of its hosts is published");
        super::builds::print_log_tail(b);
    }
    print_warnings(&published.reports);
    // Issue #12: hosts held back by a failed --build are in the summary and --json too.
    let mut reports = published.reports;
    reports.extend(not_built);
    reports.sort_by(|a, b| a.host.cmp(&b.host));

    if args.json && args.wait.is_none() {
        output::json(&reports)?;
    } else if !args.json {
        let width = reports
            .iter()
            .map(|r| r.host.as_str().len())
            .max()
            .unwrap_or(0);
        for r in &reports {
            output::line(&format_line(r, width));
        }
    }
    let count = |s| reports.iter().filter(|r| r.status == s).count();
    tracing::info!(
        "{} published, {} unchanged, {} failed ({})",
        count(Status::Published),
        count(Status::Unchanged),
        count(Status::Failed),
        chroot.root.display()
    );
    let mut failed = count(Status::Failed) + if everything { broken } else { 0 };
    if let Some(dir) = &args.export {
        failed += export(&fleet, &chroot, &args.hosts, dir)?;
    }
    // rollout (#13): --wait follows the hosts that are live (cli/wait.rs).
    if let Some(timeout) = args.wait {
        let ok = super::wait::after_publish(&fleet, &chroot, &reports, timeout, args.json)?;
        return Ok(if ok && failed + build_failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(super::EXIT_ERROR)
        });
    }
    Ok(if failed + build_failed > 0 {
        ExitCode::from(super::EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}

/// `--export DIR`: each host's live tree into `DIR/<host>/`; returns how many hosts failed
/// (each named on stderr; the others are still exported).
fn export(
    fleet: &Fleet,
    chroot: &Chroot,
    hosts: &[HostName],
    dir: &std::path::Path,
) -> anyhow::Result<usize> {
    let store = super::select::store_of(fleet, chroot)?;
    let hosts = if hosts.is_empty() {
        store
            .hosts()
            .with_context(|| format!("listing the hosts to export into {}", dir.display()))?
    } else {
        hosts.to_vec()
    };
    let mut failed = 0;
    for host in &hosts {
        match crate::server::export::export_host(&*store, host, dir) {
            Ok(e) => match e.version {
                Some(v) => output::note(&format!(
                    "exported {host} version {} to {} ({} files written, {} removed)",
                    v.short(),
                    dir.join(host.as_str()).display(),
                    e.written,
                    e.removed
                )),
                None => output::note(&format!("{host}: nothing published, nothing exported")),
            },
            Err(e) => {
                failed += 1;
                eprintln!("error: export into {}: {e}", dir.display());
            }
        }
    }
    Ok(failed)
}

/// `bento publish --refresh`: the live versions' stamps re-signed, nothing else written.
fn refresh(
    fleet: &Fleet,
    chroot: &Chroot,
    only: &[HostName],
    json: bool,
) -> anyhow::Result<ExitCode> {
    let signer = publish::load_signer(fleet)?;
    let Some(window) = publish::freshness_window(&fleet.config, signer.as_ref())? else {
        anyhow::bail!(
            "{}: [server] freshness is not set, so there are no freshness stamps to re-sign (set e.g. freshness = \"7d\" and publish, or drop --refresh)",
            fleet.root.join(crate::server::fleet::FLEET_FILE).display()
        );
    };
    let signer = signer.expect("freshness_window refuses a window without a key");
    let store = super::select::store_of(fleet, chroot)?;
    let lock_path = chroot.lock_path();
    let _lock = publish::open_store(&*store, || {
        output::note(&format!(
            "another publish holds {}; waiting",
            lock_path.display()
        ))
    })
    .with_context(|| format!("opening {}", chroot.root.display()))?;
    let hosts = if only.is_empty() {
        store.hosts().context("listing the hosts in the store")?
    } else {
        only.to_vec()
    };
    let now = SystemTime::now();
    let stamping = publish::Stamping { window, now };
    let done = publish::refresh(&*store, &hosts, &signer, stamping);
    let not_after = crate::protocol::Timestamp::seconds(now + window);
    let failed = done.iter().filter(|r| r.error.is_some()).count();
    let stamped = done.iter().filter(|r| r.version.is_some()).count();
    if json {
        output::json(&serde_json::json!({
            "not_after": not_after.as_str(),
            "hosts": done,
        }))?;
    } else {
        for r in done.iter().filter(|r| r.error.is_some()) {
            output::warning(&format!(
                "{}: {}",
                r.host,
                r.error.as_deref().unwrap_or_default()
            ));
        }
        output::line(&format!(
            "re-signed the freshness stamps of {stamped} hosts until {not_after}{}",
            match failed {
                0 => String::new(),
                n => format!(" ({n} failed)"),
            }
        ));
    }
    Ok(if failed > 0 {
        ExitCode::from(super::EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}

/// What to publish of the working tree.
pub struct Tree<'a> {
    /// The hosts (empty: every host).
    pub only: Vec<HostName>,
    /// Systems `--build` built, by host.
    pub systems: std::collections::BTreeMap<HostName, crate::nix::StorePath>,
    /// The evaluation gate (issue #12); off with `--no-eval`.
    pub eval: bool,
    /// Parallel evaluations and server builds.
    pub jobs: usize,
    pub on_host: &'a (dyn Fn(&HostReport) + Sync),
    /// `--serial-floor N`.
    pub serial_floor: Option<u64>,
    /// What the journal calls this run (`publish`, `rollout step`).
    pub action: &'a str,
    /// Hosts named one by one (`publish --host`): publishing them releases a rollback's
    /// hold. Every other rolled-back host keeps its live version.
    pub release: &'a [HostName],
    /// Decide as publish does and write nothing: no journal, no hold released.
    pub dry_run: bool,
}

/// Publishes the working tree into `chroot`, as `bento publish` and each rollout wave do:
/// signed when a key is set, through the evaluation gate, `build_on = "server"` hosts built
/// and given their binary cache before their manifest goes live (server::delivery).
pub fn publish_tree(
    fleet: &Fleet,
    chroot: &Chroot,
    tree: Tree<'_>,
) -> anyhow::Result<publish::Published> {
    publish_tree_held(fleet, chroot, tree).map(|(published, _)| published)
}

/// [`publish_tree`], and the rolled-back hosts it left out.
pub fn publish_tree_held(
    fleet: &Fleet,
    chroot: &Chroot,
    tree: Tree<'_>,
) -> anyhow::Result<(publish::Published, Vec<crate::server::records::Hold>)> {
    let signer = publish::load_signer(fleet)?;
    let freshness = publish::freshness_window(&fleet.config, signer.as_ref())?;
    if signer.is_none() {
        tracing::warn!(
            "manifests are not signed: set [server] signing_key in bento.toml (see `bento keygen`)"
        );
    }
    let records = crate::server::records::dir(chroot);
    let holds = crate::server::records::Holds::new(&records);
    let serials = crate::server::records::Serials::new(&records);
    let (only, held) = leave_held(fleet, chroot, &holds, tree.only, tree.release)?;
    let Some(only) = only else {
        if !tree.dry_run {
            journal_publish(fleet, chroot, tree.action, &[], &held, &holds, &serials)?;
        }
        return Ok((publish::Published::default(), held));
    };
    let now = SystemTime::now();
    let scanner = Scanner::new(
        fleet.root.clone(),
        HashCache::load(&chroot.hash_cache_path()),
        now,
    );
    let flakes = NixFlakeHosts::new(Nix::default(), Some(chroot.flake_cache_path()));
    let lock_path = chroot.lock_path();
    let store = super::select::store_of(fleet, chroot)?;
    let mut delivery = crate::server::delivery::FleetDelivery::new(
        fleet,
        Nix::default(),
        tree.eval,
        tree.jobs,
        now,
    )?;
    if tree.dry_run {
        delivery = delivery.dry();
    }
    let published = publish::run(
        fleet,
        &flakes,
        &scanner,
        publish::Options {
            store: &*store,
            chroot: chroot.clone(),
            only,
            systems: tree.systems,
            now,
            signer: signer.as_ref(),
            on_wait: Box::new(move || {
                output::note(&format!(
                    "another publish holds {}; waiting",
                    lock_path.display()
                ));
            }),
            on_host: tree.on_host,
            delivery: Some(&delivery),
            serial_floor: tree.serial_floor,
            dry_run: tree.dry_run,
            freshness,
            serials: &serials,
        },
    )
    .with_context(|| format!("publishing {}", fleet.root.display()))?;
    // Every host's scan, freed beside the journal and the report rather than before them.
    crate::sys::drop_aside(scanner);
    if tree.dry_run {
        return Ok((published, held));
    }
    journal_publish(
        fleet,
        chroot,
        tree.action,
        &published.reports,
        &held,
        &holds,
        &serials,
    )?;
    Ok((published, held))
}

/// Leaves out the rolled-back hosts not named one by one, each with a warning saying how to
/// release it. `None`: every selected host is held, nothing to publish.
#[allow(clippy::type_complexity)]
fn leave_held(
    fleet: &Fleet,
    chroot: &Chroot,
    holds: &crate::server::records::Holds,
    only: Vec<HostName>,
    release: &[HostName],
) -> anyhow::Result<(Option<Vec<HostName>>, Vec<crate::server::records::Hold>)> {
    let all = holds
        .all()
        .with_context(|| format!("reading the rollback holds of {}", chroot.root.display()))?;
    let held: Vec<_> = all
        .into_iter()
        .filter(|h| !release.contains(&h.host))
        .filter(|h| only.is_empty() || only.contains(&h.host))
        .collect();
    if held.is_empty() {
        return Ok((Some(only), held));
    }
    for h in &held {
        output::warning(&held_warning(h));
    }
    // An empty selection means every host: spell it out, so the held ones can be left out.
    let all = if only.is_empty() {
        super::select::discovered(fleet, chroot)?
    } else {
        only
    };
    let rest: Vec<HostName> = all
        .into_iter()
        .filter(|n| !held.iter().any(|h| &h.host == n))
        .collect();
    Ok(((!rest.is_empty()).then_some(rest), held))
}

/// What publish says about a host it leaves on its rollback.
pub fn held_warning(h: &crate::server::records::Hold) -> String {
    format!(
        "not publishing {host}: it was rolled back by {by} at {at} (from {from} to the content of {to}) and stays on {version} until released: `bento publish --host {host}` or `bento rollback --release {host}`",
        host = h.host,
        by = h.by,
        at = h.at,
        from = h.from.map_or_else(|| "-".into(), |d| d.short()),
        to = h.to.short(),
        version = h.version.short(),
    )
}

/// Writes the run into the journal, and lifts the holds of the named hosts it published.
fn journal_publish(
    fleet: &Fleet,
    chroot: &Chroot,
    action: &str,
    reports: &[HostReport],
    held: &[crate::server::records::Hold],
    holds: &crate::server::records::Holds,
    serials: &crate::server::records::Serials,
) -> anyhow::Result<()> {
    use crate::server::records::{Entry, Journal, JournalHost};
    let records = crate::server::records::dir(chroot);
    let mut hosts = Vec::new();
    for r in reports {
        let released = if r.status != Status::Failed {
            holds
                .release(&r.host)
                .with_context(|| format!("releasing the rollback hold of {}", r.host))?
        } else {
            None
        };
        if released.is_some() {
            output::note(&format!("{}: rollback hold released", r.host));
        }
        hosts.push(JournalHost {
            host: r.host.clone(),
            result: status_word(r.status).to_owned(),
            version: r.digest,
            serial: serials
                .get(&r.host)
                .ok()
                .flatten()
                .filter(|_| r.digest.is_some()),
            detail: r
                .error
                .clone()
                .or_else(|| released.map(|_| "rollback hold released".to_owned())),
        });
    }
    for h in held {
        hosts.push(JournalHost {
            host: h.host.clone(),
            result: "held".to_owned(),
            version: Some(h.version),
            serial: None,
            detail: Some("rolled back; left as it is".to_owned()),
        });
    }
    // An entry for what changed or was decided: runs that changed nothing are not news.
    if !hosts.iter().any(|h| {
        h.result == "published"
            || h.result == "held"
            || h.detail.as_deref() == Some("rollback hold released")
    }) {
        return Ok(());
    }
    let journal = Journal::new(&records);
    journal
        .append(&Entry {
            time: crate::protocol::Timestamp::seconds(SystemTime::now()).to_string(),
            who: crate::server::records::operator(),
            action: action.to_owned(),
            commit: publish::source_commit(&fleet.root).map(|c| c.id),
            hosts,
        })
        .with_context(|| format!("writing the journal {}", journal.path().display()))
}

/// Each warning once on stderr (a flake directory's warning is in each of its hosts' reports).
pub fn print_warnings(reports: &[HostReport]) {
    let mut seen = std::collections::BTreeSet::new();
    for w in reports.iter().flat_map(|r| &r.warnings) {
        if seen.insert(w) {
            output::warning(w);
        }
    }
}

/// One result line: `alpha  published  3f2a1b9c0d12  40 entries, 1 file, 3 new objects, 4.1 KiB`.
pub fn format_line(r: &HostReport, width: usize) -> String {
    let digest = r
        .digest
        .map(|d| d.short())
        .unwrap_or_else(|| "-".repeat(12));
    let status = match &r.reason {
        Some(why) => format!("{} ({why})", status_word(r.status)),
        None => status_word(r.status).to_owned(),
    };
    let detail = match (&r.error, r.status) {
        (Some(e), _) => e.clone(),
        (None, Status::Published) => format!(
            "{} entries, {} file{}, {} new object{}, {}",
            r.config_entries,
            r.files,
            if r.files == 1 { "" } else { "s" },
            r.new_objects,
            if r.new_objects == 1 { "" } else { "s" },
            output::bytes(r.bytes)
        ),
        (None, _) => format!(
            "{} entries, {} file{}",
            r.config_entries,
            r.files,
            if r.files == 1 { "" } else { "s" }
        ),
    };
    format!("{:width$}  {status:9}  {digest}  {detail}", r.host.as_str())
}

fn status_word(s: Status) -> &'static str {
    match s {
        Status::Published => "published",
        Status::Unchanged => "unchanged",
        Status::Failed => "failed",
    }
}
