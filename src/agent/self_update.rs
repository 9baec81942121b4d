//! Self-update: the applied version's flake inputs re-locked by the host itself (at most
//! daily, when nothing new is published), applied like a published version and reported as
//! `auto-updated`.
//!
//! Invariant: the applied tree is never modified — the re-lock happens on a copy
//! (`config/.self-update`), so a failed or identical result leaves the host as it was and
//! the next published version replaces any self-update.
//!
//! A version the server builds (`build_on = "server"`: the manifest names its `system` and
//! `cache/` holds that system's narinfo) is never self-updated: re-locking and building on
//! the host is exactly what its operator chose to avoid.

use std::path::Path;

use super::apply::{first_error_line, Attempt};
use super::config::snapshot_settings;
use super::fetch;
use super::host::Realise;
use super::outcome::{secs, state_err, AgentError, AttemptError, RunResult, UpdateOptions};
use super::record::{no_op, Run};
use super::source::Connection;
use super::state::{State, StateDir};
use super::substitute;
use crate::nix::Target;
use crate::protocol::manifest::{Digest, Manifest};
use crate::protocol::report::{Outcome, RunKind};
use crate::protocol::StorePath;

pub fn self_update(
    opts: &UpdateOptions<'_>,
    dirs: &StateDir,
    state: &mut State,
    conn: &mut Box<dyn Connection>,
    version: Digest,
    running: Option<StorePath>,
) -> Result<RunResult, AgentError> {
    let cfg = opts.config;
    state.self_update_at = Some(secs((opts.now)()));
    dirs.save(state).map_err(state_err(&dirs.state_file()))?;
    if let Some(system) = served_prebuilt(conn.as_mut(), version)? {
        tracing::info!(
            "self-update skipped: version {} is built by the server ({system} is in its cache/, build_on = \"server\"); the host does not re-lock or build",
            version.short()
        );
        let reason = format!(
            "up to date (version {}); self-update skipped: the server builds this version",
            version.short()
        );
        return Ok(no_op(opts, conn.as_mut(), state, running.as_ref(), reason));
    }
    let applied_dir = dirs.config().join(version.to_hex());
    let work = dirs.config().join(".self-update");
    let copy = || -> std::io::Result<()> {
        if work.exists() {
            std::fs::remove_dir_all(&work)?;
        }
        copy_tree(&applied_dir, &work)
    };
    copy().map_err(state_err(&work))?;
    let mut run = Run::start(opts, dirs, running.clone(), RunKind::AutoUpdated);
    run.log.step(&format!(
        "self-update of version {}: re-locking flake inputs",
        version.short()
    ));
    let mut attempt = Attempt {
        cfg,
        dirs,
        host: opts.host,
        version,
        running: running.clone(),
        built: None,
        reboot_required: false,
        created: None,
        applied_created: None,
        serial: None,
        applied_serial: None,
        settings: snapshot_settings(&applied_dir),
        previous: Some(version),
        installed: state.installed_files.clone(),
        checks: Vec::new(),
        confirmed: false,
        clock_warning: None,
    };
    let no_change = |why: &str| {
        let _ = std::fs::remove_dir_all(&work);
        format!("up to date (version {}); {why}", version.short())
    };
    match opts.host.relock(&work) {
        Ok(false) => Ok(no_op(
            opts,
            conn.as_mut(),
            state,
            running.as_ref(),
            no_change("no flake input moved"),
        )),
        Ok(true) => {
            let how = Realise::Build(Target::Flake {
                dir: work.clone(),
                host: cfg.host.to_string(),
            });
            let result = attempt.apply(&how, None, conn, opts, &mut run.log, &mut run.timings);
            if matches!(result, Ok(Outcome::Success)) && attempt.built.as_ref() == running.as_ref()
            {
                let reason = no_change("new inputs build the same system");
                return Ok(no_op(opts, conn.as_mut(), state, running.as_ref(), reason));
            }
            run.finish(opts, state, conn, &attempt, result)
        }
        Err(e) => {
            run.log.output(e.log());
            let result = Err(AttemptError::Failed(format!(
                "self-update: {}",
                first_error_line(&e.to_string())
            )));
            run.finish(opts, state, conn, &attempt, result)
        }
    }
}

/// The live version's system when the server serves it prebuilt. The manifest is checked
/// against its digest; one that does not match (or does not parse) says nothing.
fn served_prebuilt(
    conn: &mut dyn Connection,
    version: Digest,
) -> Result<Option<StorePath>, AgentError> {
    let bytes = fetch::manifest(conn, version)?;
    if Digest::of(&bytes) != version {
        return Ok(None);
    }
    let Ok(manifest) = Manifest::parse(&bytes) else {
        return Ok(None);
    };
    Ok(substitute::prebuilt(conn, &manifest)?)
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        let ft = entry.file_type()?;
        if ft.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else if ft.is_file() {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}
