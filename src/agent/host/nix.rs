//! The real machine: Nix for building and the profile, `switch-to-configuration` for
//! activation (what nixos-rebuild does: `nix-env -p PROFILE --set PATH`, then
//! `PATH/bin/switch-to-configuration MODE`), systemd for rebooting.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{ActivateError, Host, Realise};
use crate::agent::config::AgentConfig;
use crate::nix::{self, Built, Nix, NixError};
use crate::protocol::{Mode, StorePath};

/// How long a notification command may run.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);

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
        }
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
        let Some((program, args)) = cmd.split_first() else {
            return;
        };
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("notify command {program}: {e}");
                return;
            }
        };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(report);
        }
        let deadline = Instant::now() + NOTIFY_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if !status.success() => {
                    tracing::warn!("notify command {program} exited with {status}");
                    return;
                }
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() >= deadline => {
                    tracing::warn!(
                        "notify command {program} still running after {NOTIFY_TIMEOUT:?}; killed"
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    tracing::warn!("notify command {program}: {e}");
                    return;
                }
            }
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
        for cmd in commands {
            let Some((program, args)) = cmd.split_first() else {
                continue;
            };
            step(&format!("rebooting: {}", cmd.join(" ")));
            match Command::new(program).args(args).status() {
                Ok(s) if s.success() => return,
                Ok(s) => tracing::warn!("{} exited with {s}", cmd.join(" ")),
                Err(e) => tracing::warn!("{}: {e}", cmd.join(" ")),
            }
        }
    }

    fn schedule_reboot(&self, when: &str) {
        let reboot: Vec<String> = self
            .reboot_command
            .clone()
            .unwrap_or_else(|| vec!["systemctl".into(), "reboot".into()]);
        let _ = Command::new("systemctl")
            .args(["stop", "bento-reboot.timer"])
            .status();
        let status = Command::new("systemd-run")
            .args([
                "--unit=bento-reboot",
                "--on-calendar",
                when,
                "--timer-property=AccuracySec=1min",
                "--",
            ])
            .args(&reboot)
            .status();
        match status {
            Ok(s) if s.success() => tracing::info!("reboot scheduled for {when}"),
            Ok(s) => tracing::warn!(
                "could not schedule the reboot for {when}: systemd-run exited with {s}"
            ),
            Err(e) => tracing::warn!("could not schedule the reboot for {when}: {e}"),
        }
    }
}
