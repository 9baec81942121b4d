//! `bento diff`: per host, what changes between the system it runs (from its heartbeat) and
//! the one the working tree builds to (`--published`: the live manifest's or `bento build`'s): packages added, removed and
//! changed, and closure sizes; and what publishing the working tree would change against the
//! live version (configuration files, `files/` entries by hash, settings) and whether that
//! makes a new version, as `publish --dry-run` decides it (never re-decided here).

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
    /// Print a JSON array on stdout: per host, `status`, the two systems, `message`, the
    /// `diff` (`changes`, nvd's `text`, closure sizes), and `new_version`, `publish`,
    /// `reason` and `tree` (the working tree's changes against the live version)
    #[arg(long)]
    json: bool,
}

/// One host's comparison, as printed or as JSON.
#[derive(Debug, serde::Serialize)]
struct HostDiff {
    host: HostName,
    /// `unchanged`, `changed`, `never-reported`, `no-expected-system`, `not-built`,
    /// `does-not-evaluate`, `not-in-store`, `error`.
    status: &'static str,
    running_system: Option<String>,
    expected_system: Option<String>,
    /// What the text output says besides the diff.
    message: Option<String>,
    diff: Option<ClosureDiff>,
    /// Whether publishing the working tree now gives the host a new version (`None`: the
    /// host is not in the working tree).
    new_version: Option<bool>,
    /// What publish would do: `new version`, `unchanged`, `held`, `failed`.
    publish: Option<&'static str>,
    /// Why (`files changed, settings changed`, `same system`, a hold, publish's error).
    reason: Option<String>,
    /// The working tree against the live version: configuration files, `files/` entries
    /// (path and hash, never contents), settings, the manifest's system.
    tree: Option<crate::server::publish::Changes>,
}

impl HostDiff {
    fn new(row: &HostStatus, status: &'static str, message: Option<String>) -> Self {
        Self {
            host: row.host.clone(),
            status,
            running_system: row.running_system.clone(),
            expected_system: row.expected_system.as_ref().map(ToString::to_string),
            message,
            diff: None,
            new_version: None,
            publish: None,
            reason: None,
            tree: None,
        }
    }

    /// Counts as a failure in the exit status.
    fn failed(&self) -> bool {
        matches!(
            self.status,
            "not-built" | "does-not-evaluate" | "not-in-store" | "error"
        )
    }
}

pub fn run(fleet: Option<PathBuf>, mut args: Args) -> anyhow::Result<ExitCode> {
    let fleet = super::load_fleet(fleet)?;
    let chroot = super::select::chroot_of(&fleet, args.chroot)?;
    // rollout (#13): --on adds the hosts it selects (cli/select.rs).
    args.hosts = super::select::known(&fleet, &chroot, &args.hosts, &args.on.on)?;
    let intervals = super::status::intervals(&fleet);
    let store = super::select::store_of(&fleet, &chroot)?;
    let mut rows = status::collect(&Query {
        store: &*store,
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
    // The systems are compared whatever publish's planning says (a key this user cannot
    // read, a bento.toml publish refuses): its error is named, the rest still shown.
    let planned = publish_plan(&fleet, &chroot, &args.hosts).unwrap_or_else(|e| {
        output::warning(&format!("cannot tell what publishing would change: {e:#}"));
        Vec::new()
    });
    let nvd = closure::find_nvd();
    let mut diffs = Vec::new();
    for row in rows.iter_mut() {
        use crate::server::preview::TreeSystem;
        let early = match tree.get(&row.host) {
            Some(TreeSystem::Built(s)) => {
                row.expected_system = Some(s.clone());
                None
            }
            Some(TreeSystem::NotBuilt(s)) => Some(HostDiff::new(
                row,
                "not-built",
                Some(format!(
                    "the working tree's system {s} is not built (run `bento build`)"
                )),
            )),
            Some(TreeSystem::Fails(e)) => Some(HostDiff::new(
                row,
                "does-not-evaluate",
                Some(format!("the working tree does not evaluate: {e}")),
            )),
            None => None,
        };
        let mut d = early.unwrap_or_else(|| compare(&nix, nvd.as_deref(), row));
        if let Some(p) = planned.iter().find(|p| p.host == d.host) {
            d.new_version = Some(p.new_version);
            d.publish = Some(p.result);
            d.reason = p.error.clone().or_else(|| p.reason.clone());
            d.tree = p.changes.clone();
            if d.status == "unchanged" && p.changes.as_ref().is_some_and(|c| !c.is_empty()) {
                d.message = Some(format!(
                    "runs the expected system {}; the system does not change",
                    row.expected_system
                        .as_ref()
                        .map(|s| s.short_hash(8).to_string())
                        .unwrap_or_default()
                ));
            }
        }
        diffs.push(d);
    }
    let failed = diffs.iter().filter(|d| d.failed()).count();
    if args.json {
        output::json(&diffs)?;
    } else {
        for (i, d) in diffs.iter().enumerate() {
            if i > 0 {
                output::line("");
            }
            print_host(d);
        }
    }
    Ok(if failed > 0 {
        ExitCode::from(super::EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}

/// What `publish --dry-run` says of the working tree's hosts among `hosts` (empty: all);
/// nothing without a `hosts/` directory (a fleet known only from its chroot).
fn publish_plan(
    fleet: &crate::server::fleet::Fleet,
    chroot: &crate::protocol::layout::Chroot,
    hosts: &[HostName],
) -> anyhow::Result<Vec<super::dry_run::Planned>> {
    if !fleet.root.join(crate::server::fleet::HOSTS_DIR).is_dir() {
        return Ok(Vec::new());
    }
    let only: Vec<HostName> = if hosts.is_empty() {
        Vec::new()
    } else {
        let defined = super::select::discovered(fleet, chroot)?;
        let only: Vec<HostName> = hosts
            .iter()
            .filter(|h| defined.contains(h))
            .cloned()
            .collect();
        if only.is_empty() {
            return Ok(Vec::new());
        }
        only
    };
    Ok(super::dry_run::plan(fleet, chroot, &only, true, None)?.0)
}

/// One host's comparison.
fn compare(nix: &Nix, nvd: Option<&std::path::Path>, row: &HostStatus) -> HostDiff {
    let Some(running) = &row.running_system else {
        return HostDiff::new(
            row,
            "never-reported",
            Some("has never reported its running system; nothing to compare".into()),
        );
    };
    let Some(expected) = &row.expected_system else {
        return HostDiff::new(row, "no-expected-system", Some("no expected system for its published version (run `bento build` or `bento publish --build`)".into()));
    };
    let Ok(running) = StorePath::new(running) else {
        return HostDiff::new(
            row,
            "error",
            Some(format!(
                "reports a running system that is not a store path: {running:?}"
            )),
        );
    };
    if &running == expected {
        return HostDiff::new(
            row,
            "unchanged",
            Some(format!(
                "runs the expected system {}; nothing changes",
                expected.short_hash(8)
            )),
        );
    }
    match closure::diff(nix, nvd, &running, expected) {
        Ok(diff) => HostDiff {
            diff: Some(diff),
            ..HostDiff::new(row, "changed", None)
        },
        Err(ClosureError::NotInStore(path)) => {
            let message = if path == running {
                format!("its running system {path} is not in this server's Nix store (copy it from the host with `nix copy --from`, or build the version it runs)")
            } else {
                format!("the expected system {path} is not in this server's Nix store (run `bento build`)")
            };
            HostDiff::new(row, "not-in-store", Some(message))
        }
        Err(e) => {
            tracing::error!("{}: {e}", row.host);
            HostDiff::new(
                row,
                "error",
                Some(format!(
                    "cannot compare: {}",
                    e.to_string().lines().next().unwrap_or("")
                )),
            )
        }
    }
}

/// The text form: a heading line, then the diff or what stood in its way.
fn print_host(d: &HostDiff) {
    let host = &d.host;
    let short = |p: &Option<String>| {
        p.as_deref()
            .and_then(|p| StorePath::new(p).ok())
            .map(|p| p.short_hash(8).to_string())
            .unwrap_or_default()
    };
    let compared = matches!(d.status, "changed" | "not-in-store")
        || d.message
            .as_deref()
            .is_some_and(|m| m.starts_with("cannot compare"));
    if !compared {
        output::line(&format!(
            "{host}: {}",
            d.message.as_deref().unwrap_or_default()
        ));
        print_tree(d);
        return;
    }
    output::line(&format!(
        "{host}: {} (running) → {} (expected)",
        short(&d.running_system),
        short(&d.expected_system)
    ));
    if let Some(diff) = &d.diff {
        print_diff(diff);
    }
    if let Some(m) = &d.message {
        output::line(&format!("  {m}"));
    }
    print_tree(d);
}

/// The working tree's changes and publish's decision: `  files: changed secrets/db.age
/// (sha256 1a2b3c4d… → 5e6f7a8b…)`, `  settings: interval "15m" → "5m"`, `  new version: yes
/// (files changed, settings changed)`.
fn print_tree(d: &HostDiff) {
    let Some(publish) = d.publish else {
        return;
    };
    if let Some(t) = &d.tree {
        let short = |h: &Option<String>| {
            h.as_deref()
                .map(|h| format!("{}…", &h[..h.len().min(12)]))
                .unwrap_or_else(|| "∅".to_owned())
        };
        if t.first_version {
            output::line("  first version: nothing published for it yet");
        }
        for c in &t.config {
            output::line(&format!(
                "  configuration: {} {}",
                c.change.as_str(),
                c.path
            ));
        }
        for f in &t.files {
            let mut what = format!(
                "  files: {} {} ({}sha256 {} → {})",
                f.change.as_str(),
                f.path,
                if f.secret { "secret, " } else { "" },
                short(&f.sha256_before),
                short(&f.sha256_after)
            );
            if !f.attributes.is_empty() {
                what.push_str(&format!(" [{}]", f.attributes.join(", ")));
            }
            output::line(&what);
        }
        for s in &t.settings {
            output::line(&format!("  settings: {} {} → {}", s.key, s.before, s.after));
        }
        if let Some(s) = &t.system {
            let p = |p: &Option<String>| p.clone().unwrap_or_else(|| "none".to_owned());
            output::line(&format!("  system: {} → {}", p(&s.before), p(&s.after)));
        }
    }
    let answer = match (publish, d.new_version) {
        (_, Some(true)) => "yes".to_owned(),
        ("unchanged", _) => "no (unchanged)".to_owned(),
        (word, _) => format!("no ({word})"),
    };
    match &d.reason {
        Some(why) if d.new_version == Some(true) => {
            output::line(&format!("  new version: {answer} ({why})"))
        }
        Some(why) if publish == "unchanged" => {
            output::line(&format!("  new version: no (unchanged ({why}))"))
        }
        Some(why) => output::line(&format!("  new version: {answer}: {why}")),
        None => output::line(&format!("  new version: {answer}")),
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
