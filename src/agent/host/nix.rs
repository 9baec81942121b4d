//! The real machine: Nix for building and the profile, `switch-to-configuration` for
//! activation (what nixos-rebuild does: `nix-env -p PROFILE --set PATH`, then
//! `PATH/bin/switch-to-configuration MODE`), systemd for rebooting.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{probe, ActivateError, Host, Realise};
use crate::agent::config::AgentConfig;
use crate::nix::{self, Built, Nix, NixError};
use crate::protocol::check::HttpUrl;
use crate::protocol::{Mode, StorePath};
use crate::sys::process::Cmd;

/// How long a notification command may run.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);
/// systemctl and systemd-run return at once (they only queue jobs); a hung bus must not
/// hold the run.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(60);

pub struct NixHost {
    pub nix: Nix,
    pub profile: PathBuf,
    pub current_system: PathBuf,
    pub booted_system: PathBuf,
    /// How to reboot (default: `systemctl kexec`, falling back to `systemctl reboot`).
    pub reboot_command: Option<Vec<String>>,
}

impl NixHost {
    /// The machine as agent.toml describes it.
    pub fn new(nix: Nix, cfg: &AgentConfig) -> Self {
        Self {
            nix,
            profile: cfg.profile.clone(),
            current_system: cfg.current_system.clone(),
            booted_system: cfg.booted_system.clone(),
            reboot_command: cfg.reboot_command.clone(),
        }
    }
}

impl Host for NixHost {
    fn running(&self) -> std::io::Result<Option<StorePath>> {
        // /run/current-system is what runs; without it (a fresh install, tests), the
        // profile's selected generation counts as running.
        if std::fs::symlink_metadata(&self.current_system).is_ok() {
            return nix::profile_target(&self.current_system);
        }
        nix::profile_target(&self.profile)
    }

    fn booted(&self) -> Option<StorePath> {
        nix::profile_target(&self.booted_system).ok().flatten()
    }

    fn boot_files_differ(&self, booted: &StorePath, new: &StorePath) -> bool {
        ["kernel", "initrd", "kernel-modules"].iter().any(|f| {
            let read = |p: &StorePath| std::fs::canonicalize(p.as_path().join(f)).ok();
            read(booted) != read(new)
        })
    }

    fn realise(&self, how: &Realise) -> Result<Built, NixError> {
        match how {
            Realise::Build(target) => self.nix.build(target),
            Realise::Substitute {
                system,
                cache,
                paths,
                keys,
            } => {
                let log = self.nix.import_from_cache(cache, paths, keys)?;
                if !self
                    .nix
                    .valid_paths(std::slice::from_ref(system))?
                    .contains(system)
                {
                    return Err(NixError::Output {
                        argv: "nix copy --from file://".to_owned() + &cache.display().to_string(),
                        message: format!("{system} is not valid after the import"),
                    });
                }
                Ok(Built {
                    path: system.clone(),
                    log,
                })
            }
        }
    }

    fn valid_paths(
        &self,
        paths: &[StorePath],
    ) -> Result<std::collections::BTreeSet<StorePath>, NixError> {
        self.nix.valid_paths(paths)
    }

    fn set_profile(&self, path: &StorePath) -> Result<(), NixError> {
        if let Some(parent) = self.profile.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        self.nix.set_profile(&self.profile, path)
    }

    fn relock(&self, dir: &Path) -> Result<bool, NixError> {
        let before = std::fs::read(dir.join("flake.lock")).ok();
        self.nix.flake_update(dir, None)?;
        Ok(std::fs::read(dir.join("flake.lock")).ok() != before)
    }

    fn activate(&self, path: &StorePath, mode: Mode) -> Result<String, ActivateError> {
        super::activate::activate(path, mode)
    }

    fn notify(&self, cmd: &[String], report: &[u8]) {
        let Some(notify) = Cmd::from_argv(cmd) else {
            return;
        };
        // A hook must never hold the run (and its lock) up: bounded, and only logged.
        if let Err(e) = notify.stdin(report.to_vec()).timeout(NOTIFY_TIMEOUT).run() {
            tracing::warn!("notify command: {e}");
        }
    }

    fn reboot_now(&self, step: &mut dyn FnMut(&str)) {
        let commands: Vec<Vec<String>> = match &self.reboot_command {
            Some(c) => vec![c.clone()],
            // kexec skips the firmware where the machine can; reboot otherwise.
            None => vec![
                vec!["systemctl".into(), "kexec".into()],
                vec!["systemctl".into(), "reboot".into()],
            ],
        };
        for argv in commands {
            let Some(cmd) = Cmd::from_argv(&argv) else {
                continue;
            };
            step(&format!("rebooting: {}", argv.join(" ")));
            match cmd.timeout(SYSTEMCTL_TIMEOUT).run() {
                Ok(_) => return,
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }

    fn schedule_reboot(&self, when: &str) {
        let reboot: Vec<String> = self
            .reboot_command
            .clone()
            .unwrap_or_else(|| vec!["systemctl".into(), "reboot".into()]);
        let _ = Cmd::new("systemctl")
            .args(["stop", "bento-reboot.timer"])
            .timeout(SYSTEMCTL_TIMEOUT)
            .run();
        let scheduled = Cmd::new("systemd-run")
            .args([
                "--unit=bento-reboot",
                "--on-calendar",
                when,
                "--timer-property=AccuracySec=1min",
                "--",
            ])
            .args(&reboot)
            .timeout(SYSTEMCTL_TIMEOUT)
            .run();
        match scheduled {
            Ok(_) => tracing::info!("reboot scheduled for {when}"),
            Err(e) => tracing::warn!("could not schedule the reboot for {when}: {e}"),
        }
    }

    fn failed_units(&self) -> Option<Result<BTreeSet<String>, String>> {
        probe::systemd_running().then(probe::failed_units)
    }

    fn unit_state(&self, unit: &str, timeout: Duration) -> Result<String, String> {
        probe::unit_state(unit, timeout)
    }

    fn run_check_command(&self, argv: &[String], timeout: Duration) -> Result<String, String> {
        probe::run_command(argv, timeout)
    }

    fn http_get(&self, url: &HttpUrl, timeout: Duration) -> Result<u16, String> {
        probe::http_get(url, timeout)
    }
}
