//! `bento flake-update [INPUT]`: update the lock file of every flake directory under
//! `hosts/` and say, per directory, which inputs changed.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::nix::Nix;
use crate::server::build::flake_lock::{self, ChangeKind};
use crate::server::fleet::HOSTS_DIR;
use crate::sys::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Update only this input (default: every input)
    #[arg(value_name = "INPUT")]
    input: Option<String>,
    /// Print a JSON array on stdout: per flake directory, `dir`, `status` (`unchanged`,
    /// `updated`, `no-such-input`, `failed`), `changes` and `error`
    #[arg(long)]
    json: bool,
}

/// One flake directory's result.
#[derive(Debug, serde::Serialize)]
struct DirResult {
    dir: String,
    status: &'static str,
    changes: Vec<flake_lock::InputChange>,
    error: Option<String>,
}

pub fn run(fleet: Option<PathBuf>, args: Args) -> anyhow::Result<ExitCode> {
    let fleet = super::load_fleet(fleet)?;
    let hosts = fleet.root.join(HOSTS_DIR);
    let mut dirs = Vec::new();
    for entry in
        std::fs::read_dir(&hosts).with_context(|| format!("reading {}", hosts.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.path().join("flake.nix").is_file() {
            dirs.push(name);
        }
    }
    dirs.sort();
    if dirs.is_empty() {
        output::note("no flake directory under hosts/: nothing to update");
        if args.json {
            output::json(&Vec::<DirResult>::new())?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let nix = Nix::default();
    let scanner = crate::server::snapshot::Scanner::new(
        fleet.root.clone(),
        crate::server::snapshot::HashCache::default(),
        std::time::SystemTime::now(),
    );
    let width = dirs
        .iter()
        .map(|d| d.len() + HOSTS_DIR.len() + 1)
        .max()
        .unwrap_or(0);
    let mut failed = 0;
    let mut has_input = false;
    let mut results = Vec::new();
    let result_of = |dir: &str, status, changes, error| DirResult {
        dir: dir.to_owned(),
        status,
        changes,
        error,
    };
    for name in &dirs {
        let dir = hosts.join(name);
        let shown = format!("{HOSTS_DIR}/{name}");
        if let Some(input) = &args.input {
            // Nix only warns about an input a flake does not have; say it plainly instead.
            let lock = std::fs::read_to_string(dir.join(flake_lock::LOCK_FILE)).ok();
            if lock.is_some_and(|l| !flake_lock::root_inputs(&l).contains(input)) {
                results.push(result_of(&shown, "no-such-input", Vec::new(), None));
                continue;
            }
        }
        let result = flake_lock::update_fleet_dir(&nix, &scanner, &dir, args.input.as_deref());
        if let (Some(input), Ok(_)) = (&args.input, &result) {
            // A flake without inputs gets no lock file at all.
            let lock = std::fs::read_to_string(dir.join(flake_lock::LOCK_FILE)).ok();
            if !lock.is_some_and(|l| flake_lock::root_inputs(&l).contains(input)) {
                results.push(result_of(&shown, "no-such-input", Vec::new(), None));
                continue;
            }
        }
        match result {
            Ok(changes) => {
                has_input = true;
                let status = if changes.is_empty() {
                    "unchanged"
                } else {
                    "updated"
                };
                results.push(result_of(&shown, status, changes, None));
            }
            Err(e) => {
                failed += 1;
                tracing::error!("{shown}: {e}");
                let first = e.to_string().lines().next().unwrap_or("").to_owned();
                results.push(result_of(&shown, "failed", Vec::new(), Some(first)));
            }
        }
    }
    if args.json {
        output::json(&results)?;
    } else {
        for r in &results {
            print_result(r, width, args.input.as_deref());
        }
    }
    if let (Some(input), false, 0) = (&args.input, has_input, failed) {
        anyhow::bail!("no flake directory has an input named {input}");
    }
    Ok(if failed > 0 {
        ExitCode::from(super::EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_result(r: &DirResult, width: usize, input: Option<&str>) {
    let shown = &r.dir;
    match r.status {
        "no-such-input" => output::line(&format!(
            "{shown:width$}  no input named {}",
            input.unwrap_or_default()
        )),
        "failed" => output::line(&format!(
            "{shown:width$}  failed  {}",
            r.error.as_deref().unwrap_or_default()
        )),
        _ if r.changes.is_empty() => output::line(&format!("{shown:width$}  unchanged")),
        _ => {
            for c in &r.changes {
                let what = match c.change {
                    ChangeKind::Added => {
                        format!("added    {}", c.after.as_deref().unwrap_or_default())
                    }
                    ChangeKind::Removed => {
                        format!("removed  {}", c.before.as_deref().unwrap_or_default())
                    }
                    ChangeKind::Updated => format!(
                        "updated  {} → {}",
                        c.before.as_deref().unwrap_or_default(),
                        c.after.as_deref().unwrap_or_default()
                    ),
                };
                output::line(&format!("{shown:width$}  {}  {what}", c.input));
            }
        }
    }
}
