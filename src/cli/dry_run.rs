//! `bento publish --dry-run`: which hosts would get a new version and why, decided by the
//! planning publish itself runs (`publish_tree` with `dry_run`: discovery, the evaluation
//! gate, sealing, `same system`, holds, serial numbering), with nothing written: no lock,
//! cache, record, journal line or file in the chroot or the publisher's state.

use std::collections::BTreeMap;
use std::process::ExitCode;

use crate::protocol::layout::Chroot;
use crate::protocol::manifest::Digest;
use crate::server::fleet::{Fleet, HostName};
use crate::server::publish::{Changes, HostReport, Status};
use crate::sys::output;

/// One host: what publishing it now would do.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Planned {
    pub host: HostName,
    /// `new version`, `unchanged`, `held` or `failed`.
    pub result: &'static str,
    pub new_version: bool,
    /// Why: `files changed, settings changed`, `same system`, `rolled back …`.
    pub reason: Option<String>,
    /// The live version now.
    pub live: Option<Digest>,
    /// What a new version would change against the live one.
    pub changes: Option<Changes>,
    pub error: Option<String>,
    pub warnings: Vec<String>,
}

/// Plans `hosts` (empty: every host) as `bento publish` would, writing nothing. Also
/// returns the flake directories that could not list their hosts.
pub fn plan(
    fleet: &Fleet,
    chroot: &Chroot,
    hosts: &[HostName],
    eval: bool,
    serial_floor: Option<u64>,
) -> anyhow::Result<(Vec<Planned>, Vec<crate::server::fleet::BrokenDir>)> {
    let (published, held) = super::publish::publish_tree_held(
        fleet,
        chroot,
        super::publish::Tree {
            only: hosts.to_vec(),
            systems: BTreeMap::new(),
            eval,
            jobs: super::select::default_jobs(),
            on_host: &|_| {},
            serial_floor,
            action: "publish",
            release: hosts,
            dry_run: true,
        },
    )?;
    let mut changes = published.changes;
    let mut out: Vec<Planned> = published
        .reports
        .into_iter()
        .map(|r| planned(r, &mut changes))
        .collect();
    for h in held {
        out.push(Planned {
            host: h.host.clone(),
            result: "held",
            new_version: false,
            reason: Some(format!(
                "rolled back by {} at {}; release it with `bento publish --host {}`",
                h.by, h.at, h.host
            )),
            live: Some(h.version),
            changes: None,
            error: None,
            warnings: Vec::new(),
        });
    }
    out.sort_by(|a, b| a.host.cmp(&b.host));
    Ok((out, published.broken))
}

fn planned(r: HostReport, changes: &mut BTreeMap<HostName, Changes>) -> Planned {
    let (result, live) = match r.status {
        Status::Published => ("new version", r.digest),
        Status::Unchanged => ("unchanged", r.digest),
        Status::Failed => ("failed", r.digest),
    };
    Planned {
        changes: changes.remove(&r.host),
        host: r.host,
        result,
        new_version: r.status == Status::Published,
        reason: r.reason,
        live,
        error: r.error,
        warnings: r.warnings,
    }
}

/// `bento publish --dry-run [--json]`: the hosts `bento publish` with the same selection
/// would publish (`--on`, `hold = true` as publish applies them).
pub fn run(
    fleet: Option<std::path::PathBuf>,
    args: super::publish::Args,
) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let fleet = super::load_fleet(fleet)?;
    let root = args
        .chroot
        .unwrap_or_else(|| fleet.config.server.chroot.clone());
    let root = std::path::absolute(&root).with_context(|| format!("chroot {}", root.display()))?;
    let chroot = Chroot::new(root);
    let everything = args.hosts.is_empty() && args.on.on.is_empty();
    let Some(hosts) = super::select::publishable(&fleet, &chroot, &args.hosts, &args.on.on)? else {
        output::note("every selected host is held: nothing would be published");
        if args.json {
            output::json(&serde_json::json!({"result": "ok", "dry_run": true, "hosts": []}))?;
        }
        return Ok(ExitCode::SUCCESS);
    };
    let (json, hosts) = (args.json, &hosts[..]);
    let (fleet, chroot) = (&fleet, &chroot);
    let (planned, broken) = plan(fleet, chroot, hosts, !args.no_eval, args.serial_floor)?;
    for b in &broken {
        let what = if everything { "error" } else { "warning" };
        eprintln!("{what}: {b}; none of its hosts would be published");
    }
    let failed = planned.iter().filter(|p| p.result == "failed").count()
        + if everything { broken.len() } else { 0 };
    let mut seen = std::collections::BTreeSet::new();
    for w in planned.iter().flat_map(|p| &p.warnings) {
        if seen.insert(w) {
            output::warning(w);
        }
    }
    if json {
        output::json(&serde_json::json!({
            "result": if failed > 0 { "failed" } else { "ok" },
            "dry_run": true,
            "hosts": planned,
        }))?;
    } else {
        let width = planned
            .iter()
            .map(|p| p.host.as_str().len())
            .max()
            .unwrap_or(0);
        for p in &planned {
            let why = p.error.as_deref().or(p.reason.as_deref());
            let line = match why {
                Some(why) => format!("{:width$}  {} ({why})", p.host.as_str(), p.result),
                None => format!("{:width$}  {}", p.host.as_str(), p.result),
            };
            output::line(&line);
        }
        let n = planned.iter().filter(|p| p.new_version).count();
        output::note(&format!(
            "dry run: {n} host{} would get a new version; nothing was written",
            if n == 1 { "" } else { "s" }
        ));
    }
    Ok(ExitCode::from(if failed > 0 {
        super::EXIT_ERROR
    } else {
        crate::cli::exit::SUCCESS
    }))
}
