//! Building hosts on the server: each host's configuration (never its secrets) is copied to
//! a scratch directory and built there as a `path:` flake or a classic `configuration.nix`,
//! several at a time; the result is recorded per host in `<chroot>/.bento/builds/`.

pub mod flake_lock;
pub mod record;

use std::path::Path;
use std::time::{Instant, SystemTime};

use rayon::prelude::*;
use serde::Serialize;

use crate::nix::{Nix, NixError, StorePath, Target};
use crate::protocol::layout::Chroot;
use crate::protocol::manifest::Build;
use crate::server::fleet::{FlakeHosts, Fleet, HostName};
use crate::server::hostfiles::HostFilesError;
use crate::server::publish::HostPlan;
use crate::server::snapshot::Scanner;

pub use record::{content_key, BuildRecord};

/// Lines of a failed build's Nix output shown with the error.
pub const ERROR_TAIL_LINES: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Discover(#[from] crate::server::fleet::DiscoverError),
    #[error(transparent)]
    HostFiles(#[from] HostFilesError),
    #[error(transparent)]
    Plan(#[from] crate::server::publish::PublishError),
    #[error("no host named {0} in the fleet")]
    UnknownHost(HostName),
    #[error("cannot start {jobs} build jobs: {message}")]
    Jobs { jobs: usize, message: String },
}

/// How one host's build went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Built; the system is in this server's store.
    Built,
    /// `--dry`: evaluated to a derivation, not built.
    Evaluated,
    Failed,
}

/// One host's result: a line of output, one JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct HostBuild {
    pub host: HostName,
    pub outcome: Outcome,
    pub system: Option<StorePath>,
    pub drv: Option<StorePath>,
    /// What went wrong, one line.
    pub error: Option<String>,
    /// The end of Nix's output for a failed build.
    pub log_tail: Option<String>,
    /// The content key of the configuration that was built (see `record::content_key`).
    pub key: String,
    pub ms: u64,
}

/// Options of one build run.
pub struct Options<'a> {
    pub chroot: Chroot,
    /// Only these hosts (all when empty).
    pub only: Vec<HostName>,
    /// Evaluate to derivations only.
    pub dry: bool,
    /// Builds at once.
    pub jobs: usize,
    pub now: SystemTime,
    pub on_start: &'a (dyn Fn(&HostName) + Sync),
    pub on_done: &'a (dyn Fn(&HostBuild) + Sync),
}

/// What one build run did: a result per host, and the flake directories whose hosts could not
/// be listed (none of their hosts is built).
#[derive(Debug, Clone)]
pub struct Built {
    pub hosts: Vec<HostBuild>,
    pub broken: Vec<crate::server::fleet::BrokenDir>,
}

/// Builds the selected hosts, `jobs` at a time, and records each success in the chroot's
/// state. One host failing never stops the others; its error is in its result (a
/// `[hosts.NAME]` without a directory too).
pub fn run(
    fleet: &Fleet,
    flakes: &dyn FlakeHosts,
    scanner: &Scanner,
    nix: &Nix,
    opts: &Options<'_>,
) -> Result<Built, BuildError> {
    let mut found = crate::server::fleet::discover_each(fleet, scanner, flakes)?;
    let (chosen, undefined) = found.choose(&opts.only).map_err(BuildError::UnknownHost)?;
    let broken = found.broken;
    let undefined: Vec<HostBuild> = undefined
        .iter()
        .map(|h| HostBuild {
            host: h.clone(),
            outcome: Outcome::Failed,
            system: None,
            drv: None,
            error: Some(crate::server::publish::undefined_error(h, &broken)),
            log_tail: None,
            key: String::new(),
            ms: 0,
        })
        .collect();
    // Build exactly what publish would publish (generated settings included); the time is
    // not part of what is built.
    let epoch = crate::protocol::Timestamp::from_unix(0);
    let plans =
        crate::server::publish::plan(&fleet.config, &chosen, &epoch, None, &Default::default())?;
    let selected: Vec<(HostPlan, String)> = plans
        .into_iter()
        .map(|p| {
            let key = content_key(p.manifest.build, &p.manifest.config);
            (p, key)
        })
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs.max(1))
        .thread_name(|i| format!("build-{i}"))
        .build()
        .map_err(|e| BuildError::Jobs {
            jobs: opts.jobs,
            message: e.to_string(),
        })?;
    let time = humantime::format_rfc3339_seconds(opts.now).to_string();
    let results = pool.install(|| {
        selected
            .par_iter()
            .map(|(source, key)| {
                (opts.on_start)(&source.host);
                let started = Instant::now();
                let mut result = build_host(nix, source, key, opts.dry);
                // Issue #12: name the fleet repo's files in errors, not the scratch copy's.
                crate::server::eval::locate_build_failure(
                    &mut result.error,
                    &mut result.log_tail,
                    source,
                    &fleet.root,
                );
                result.ms = started.elapsed().as_millis() as u64;
                if result.outcome != Outcome::Failed {
                    let rec = BuildRecord {
                        format: record::RECORD_FORMAT,
                        host: source.host.clone(),
                        key: key.clone(),
                        system: result.system.clone(),
                        drv: result.drv.clone(),
                        built: result.outcome == Outcome::Built,
                        time: time.clone(),
                    };
                    if let Err(e) = record::write(&opts.chroot, &rec) {
                        result.outcome = Outcome::Failed;
                        result.error = Some(format!("built, but cannot record it: {e}"));
                    }
                }
                (opts.on_done)(&result);
                result
            })
            .collect::<Vec<_>>()
    });
    let mut hosts = results;
    for u in undefined {
        (opts.on_done)(&u);
        hosts.push(u);
    }
    hosts.sort_by(|a, b| a.host.cmp(&b.host));
    Ok(Built { hosts, broken })
}

/// Builds (or evaluates) one host on a scratch copy of its configuration.
fn build_host(nix: &Nix, source: &HostPlan, key: &str, dry: bool) -> HostBuild {
    // A contributor's configuration reads nothing outside its tree (`Nix::restricted`).
    let nix = &nix.clone().restricted();
    let mut result = HostBuild {
        host: source.host.clone(),
        outcome: Outcome::Failed,
        system: None,
        drv: None,
        error: None,
        log_tail: None,
        key: key.to_owned(),
        ms: 0,
    };
    let attempt = || -> Result<(Option<StorePath>, Option<StorePath>), NixError> {
        let tmp = tempfile::Builder::new()
            .prefix("bento-build-")
            .tempdir()
            .map_err(|e| scratch_error(&e))?;
        crate::server::publish::materialize_config(source, tmp.path())
            .map_err(|e| scratch_error(&e))?;
        let target = match source.manifest.build {
            Build::Flake => Target::Flake {
                dir: tmp.path().to_owned(),
                host: source.host.to_string(),
            },
            Build::Classic => Target::Classic {
                dir: tmp.path().to_owned(),
            },
        };
        if dry {
            let drv = nix.derivation(&target)?;
            let out = nix.run("nix-store", &["--query", "--outputs", drv.as_str()])?;
            let text = String::from_utf8_lossy(&out.stdout);
            let system = text
                .lines()
                .next()
                .and_then(|l| StorePath::new(l.trim()).ok());
            Ok((system, Some(drv)))
        } else {
            Ok((Some(nix.build(&target)?.path), None))
        }
    };
    match attempt() {
        Ok((system, drv)) => {
            result.outcome = if dry {
                Outcome::Evaluated
            } else {
                Outcome::Built
            };
            result.system = system;
            result.drv = drv;
        }
        Err(e) => {
            result.error = Some(first_error_line(&e));
            let log = e.log();
            result.log_tail = (!log.is_empty()).then(|| crate::nix::tail(log, ERROR_TAIL_LINES));
        }
    }
    result
}

fn scratch_error(e: &std::io::Error) -> NixError {
    NixError::Output {
        argv: "(copying the configuration)".into(),
        message: format!("cannot prepare a scratch copy: {e}"),
    }
}

/// The line of a Nix failure worth showing first: Nix's own `error:` line when there is one.
fn first_error_line(e: &NixError) -> String {
    let log = e.log();
    log.lines()
        .find(|l| l.trim_start().starts_with("error:"))
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| e.to_string().lines().next().unwrap_or_default().to_owned())
}

/// Puts `system` on `profile` and activates it with `switch-to-configuration switch`, as
/// `nixos-rebuild switch` does.
pub fn switch(nix: &Nix, profile: &Path, system: &StorePath) -> Result<(), NixError> {
    nix.set_profile(profile, system)?;
    let script = system.as_path().join("bin/switch-to-configuration");
    nix.run(&script.to_string_lossy(), &["switch"])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::protocol::manifest::Build;
    use crate::server::fleet::{HostName, HostSource};
    use crate::server::snapshot::{Item, ItemKind};

    /// A build sees exactly the published configuration: the generated settings are there,
    /// the secrets are not.
    #[test]
    fn builds_see_the_published_tree_without_secrets() {
        let src = tempfile::tempdir().unwrap();
        let file = |rel: &str, text: &str| {
            let p = src.path().join(rel.replace('/', "_"));
            std::fs::write(&p, text).unwrap();
            Item {
                path: rel.into(),
                kind: ItemKind::File {
                    source: Arc::from(p.as_path()),
                    size: text.len() as u64,
                    sha256: crate::protocol::manifest::Digest::of(text.as_bytes()),
                    executable: false,
                },
            }
        };
        let items = vec![
            file("configuration.nix", "{ }"),
            Item {
                path: "files".into(),
                kind: ItemKind::Dir,
            },
            file("files/secret", "s3cret"),
            file("files.toml", ""),
        ];
        let source = HostSource {
            name: HostName::new("alpha").unwrap(),
            dir: "hosts/alpha".into(),
            build: Build::Classic,
            files_prefix: None,
            origin: "hosts/alpha".into(),
            items: Arc::new(items),
            warnings: Vec::new(),
        };
        let plans = crate::server::publish::plan(
            &Default::default(),
            &[source],
            &crate::protocol::Timestamp::from_unix(0),
            None,
            &Default::default(),
        )
        .unwrap();
        let dest = tempfile::tempdir().unwrap();
        crate::server::publish::materialize_config(&plans[0], dest.path()).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dest.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["bento-host.json", "configuration.nix"]);
    }
}
