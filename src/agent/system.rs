//! The machine the agent manages, behind a trait so the run logic can be tested without
//! touching a real system: what runs now, building, pointing the system profile, and
//! activating (what nixos-rebuild does: `nix-env -p PROFILE --set PATH`, then
//! `PATH/bin/switch-to-configuration MODE`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::config::Mode;
use crate::nix::{self, Built, Nix, NixError, StorePath, Target};

#[derive(Debug, thiserror::Error)]
#[error("`{argv}` failed ({status}):\n{output_tail}")]
pub struct ActivateError {
    pub argv: String,
    pub status: String,
    pub output_tail: String,
    pub output: String,
}

pub trait System {
    /// The running system, if one can be told.
    fn running(&self) -> std::io::Result<Option<StorePath>>;
    fn build(&self, target: &Target) -> Result<Built, NixError>;
    /// Makes `path` the profile's current generation.
    fn set_profile(&self, path: &StorePath) -> Result<(), NixError>;
    /// Runs `path/bin/switch-to-configuration MODE`; returns its output.
    fn activate(&self, path: &StorePath, mode: Mode) -> Result<String, ActivateError>;
    /// Re-locks every input of the flake in `dir`; true when the lock file changed.
    fn relock(&self, dir: &Path) -> Result<bool, NixError>;
}

pub struct NixSystem {
    pub nix: Nix,
    pub profile: PathBuf,
    pub current_system: PathBuf,
}

impl System for NixSystem {
    fn running(&self) -> std::io::Result<Option<StorePath>> {
        // /run/current-system is what runs; without it (a fresh install, tests), the
        // profile's selected generation counts as running.
        if std::fs::symlink_metadata(&self.current_system).is_ok() {
            return nix::profile_target(&self.current_system);
        }
        nix::profile_target(&self.profile)
    }

    fn build(&self, target: &Target) -> Result<Built, NixError> {
        self.nix.build(target)
    }

    fn set_profile(&self, path: &StorePath) -> Result<(), NixError> {
        if let Some(parent) = self.profile.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        self.nix.set_profile(&self.profile, path)
    }

    fn relock(&self, dir: &Path) -> Result<bool, NixError> {
        let before = std::fs::read(dir.join("flake.lock")).ok();
        crate::server::build::flake_lock::update(&self.nix, dir, None)?;
        Ok(std::fs::read(dir.join("flake.lock")).ok() != before)
    }

    fn activate(&self, path: &StorePath, mode: Mode) -> Result<String, ActivateError> {
        let program = Path::new(path.as_str()).join("bin/switch-to-configuration");
        let argv = format!("{} {}", program.display(), mode.as_str());
        let out = Command::new(&program)
            .arg(mode.as_str())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ActivateError {
                argv: argv.clone(),
                status: "could not start".into(),
                output_tail: e.to_string(),
                output: e.to_string(),
            })?;
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            Ok(output)
        } else {
            Err(ActivateError {
                argv,
                status: out.status.to_string(),
                output_tail: nix::tail(&output, nix::STDERR_TAIL_LINES),
                output,
            })
        }
    }
}
