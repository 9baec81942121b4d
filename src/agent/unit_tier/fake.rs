//! A fake machine for the unit tier: it records every request, builds a toy tree to the
//! store path its `system` file names, and can be told to fail, to break the network on
//! activation, or to fill the disk during a build; it answers health checks from tables a
//! test fills in.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use crate::agent::host::{ActivateError, Host, Realise};
use crate::nix::{Built, NixError, Target};
use crate::protocol::check::HttpUrl;
use crate::protocol::report::Report;
use crate::protocol::{Mode, StorePath};

/// The name a toy tree's `system` file gives its build; "fail" makes the build fail.
pub const SYSTEM_FILE: &str = "system";

pub fn store_path(name: &str) -> StorePath {
    StorePath::new(&format!(
        "/nix/store/{}-nixos-system-{name}",
        "b".repeat(32)
    ))
    .unwrap()
}

/// A machine that records what it is asked to do. A tree builds to the store path its
/// `system` file names; activating makes that path the running one.
#[derive(Default)]
pub struct FakeHost {
    pub running: RefCell<Option<StorePath>>,
    pub booted: RefCell<Option<StorePath>>,
    /// Kernel per system (default "6.1"): a different one means a reboot is needed.
    pub kernels: RefCell<BTreeMap<StorePath, String>>,
    pub fail_activation: Cell<bool>,
    /// Set when an activation "breaks the network": the server is unreachable afterwards.
    pub breaks_network: Cell<bool>,
    pub server_down: Rc<Cell<bool>>,
    /// What a re-lock writes into the tree's `system` file (None: no input moved).
    pub relock_to: RefCell<Option<String>>,
    pub calls: RefCell<Vec<String>>,
    /// The store paths the machine's store holds (for substitution).
    pub store: RefCell<std::collections::BTreeSet<StorePath>>,
    /// A state directory whose spool and state file stop taking writes during the build
    /// (the disk filled up): writes fail with ENOTDIR and EISDIR, for root as well.
    pub fill_disk: RefCell<Option<PathBuf>>,
    /// systemd is the service manager (else the built-in check is skipped).
    pub systemd: Cell<bool>,
    /// Units failed whatever runs.
    pub failed: RefCell<BTreeSet<String>>,
    /// Units failed while the system of that name runs.
    pub failed_under: RefCell<BTreeMap<String, BTreeSet<String>>>,
    /// What `is-active` says of a unit, one answer per question, the last one repeated
    /// (default `active`; a failed unit says `failed`).
    pub unit_states: RefCell<BTreeMap<String, VecDeque<String>>>,
    /// The status an URL answers (default 200); a missing number means refused.
    pub http: RefCell<BTreeMap<String, Option<u16>>>,
}

impl FakeHost {
    fn call(&self, what: String) {
        self.calls.borrow_mut().push(what);
    }

    fn kernel(&self, p: &StorePath) -> String {
        self.kernels
            .borrow()
            .get(p)
            .cloned()
            .unwrap_or("6.1".into())
    }
}

impl Host for FakeHost {
    fn running(&self) -> std::io::Result<Option<StorePath>> {
        Ok(self.running.borrow().clone())
    }

    fn booted(&self) -> Option<StorePath> {
        self.booted.borrow().clone()
    }

    fn boot_files_differ(&self, booted: &StorePath, new: &StorePath) -> bool {
        self.kernel(booted) != self.kernel(new)
    }

    fn valid_paths(
        &self,
        paths: &[StorePath],
    ) -> Result<std::collections::BTreeSet<StorePath>, NixError> {
        let store = self.store.borrow();
        Ok(paths
            .iter()
            .filter(|p| store.contains(*p))
            .cloned()
            .collect())
    }

    fn realise(&self, how: &Realise) -> Result<Built, NixError> {
        let target = match how {
            Realise::Build(target) => target,
            Realise::Substitute { system, paths, .. } => {
                self.call(format!("substitute {} path(s)", paths.len()));
                self.store.borrow_mut().extend(paths.iter().cloned());
                return Ok(Built {
                    path: system.clone(),
                    log: "copying…\n".into(),
                });
            }
        };
        let dir = match target {
            Target::Flake { dir, .. } | Target::Classic { dir } => dir,
        };
        let name = std::fs::read_to_string(dir.join(SYSTEM_FILE)).unwrap_or_default();
        self.call(format!("realise {}", name.trim()));
        if let Some(state_dir) = self.fill_disk.borrow().as_ref() {
            std::fs::remove_dir_all(state_dir.join("spool")).unwrap();
            std::fs::write(state_dir.join("spool"), b"").unwrap();
            let _ = std::fs::remove_file(state_dir.join("state.json"));
            std::fs::create_dir_all(state_dir.join("state.json/full")).unwrap();
        }
        if name.trim() == "fail" {
            return Err(NixError::Command(Box::new(
                crate::sys::process::ProcessError {
                    argv: "nix build".into(),
                    ended: crate::sys::process::Ended::Exited(1),
                    stderr_tail: "error: broken on purpose".into(),
                    stderr: "error: broken on purpose\n".into(),
                    stdout: Vec::new(),
                },
            )));
        }
        Ok(Built {
            path: store_path(name.trim()),
            log: "building…\n".into(),
        })
    }

    fn set_profile(&self, path: &StorePath) -> Result<(), NixError> {
        self.call(format!("set_profile {}", path.name()));
        Ok(())
    }

    fn activate(&self, path: &StorePath, mode: Mode) -> Result<String, ActivateError> {
        self.call(format!("activate {} {}", path.name(), mode.as_str()));
        if self.fail_activation.get() && path.name() != self.running_name() {
            return Err(ActivateError {
                argv: "switch-to-configuration".into(),
                status: "exited with status 1".into(),
                output_tail: "failed".into(),
                output: "failed\n".into(),
            });
        }
        if mode.activates_now() {
            *self.running.borrow_mut() = Some(path.clone());
        }
        if self.breaks_network.get() {
            self.server_down.set(true);
        }
        Ok(String::new())
    }

    fn relock(&self, dir: &Path) -> Result<bool, NixError> {
        self.call("relock".into());
        match self.relock_to.borrow().as_deref() {
            None => Ok(false),
            Some(name) => {
                std::fs::write(dir.join(SYSTEM_FILE), name).unwrap();
                Ok(true)
            }
        }
    }

    fn notify(&self, command: &[String], report: &[u8]) {
        let report = Report::parse(report).expect("notify gets the report");
        self.call(format!(
            "notify {} {}",
            command.join(" "),
            report.outcome.as_str()
        ));
    }

    fn reboot_now(&self, _step: &mut dyn FnMut(&str)) {
        self.call("reboot_now".into());
    }

    fn schedule_reboot(&self, when: &str) {
        self.call(format!("schedule_reboot {when}"));
    }

    fn failed_units(&self) -> Option<Result<BTreeSet<String>, String>> {
        self.systemd.get().then(|| Ok(self.failed_now()))
    }

    fn unit_state(&self, unit: &str, _timeout: Duration) -> Result<String, String> {
        self.call(format!("is-active {unit}"));
        if self.failed_now().contains(unit) {
            return Ok("failed".into());
        }
        let mut states = self.unit_states.borrow_mut();
        Ok(match states.get_mut(unit) {
            Some(q) if q.len() > 1 => q.pop_front().unwrap(),
            Some(q) => q.front().cloned().unwrap_or("active".into()),
            None => "active".into(),
        })
    }

    /// `/bin/false` fails; any other command passes.
    fn run_check_command(&self, argv: &[String], _timeout: Duration) -> Result<String, String> {
        self.call(format!("command {}", argv.join(" ")));
        match argv[0].as_str() {
            "/bin/false" => Err("exited with status 1".into()),
            _ => Ok(String::new()),
        }
    }

    fn http_get(&self, url: &HttpUrl, _timeout: Duration) -> Result<u16, String> {
        self.call(format!("GET {url}"));
        match self.http.borrow().get(&url.to_string()) {
            None => Ok(200),
            Some(Some(code)) => Ok(*code),
            Some(None) => Err("connect: Connection refused".into()),
        }
    }
}

impl FakeHost {
    fn failed_now(&self) -> BTreeSet<String> {
        let mut failed = self.failed.borrow().clone();
        if let Some(under) = self.failed_under.borrow().get(&self.running_name()) {
            failed.extend(under.iter().cloned());
        }
        failed
    }

    pub fn running_name(&self) -> String {
        self.running
            .borrow()
            .as_ref()
            .map(|p| p.name().to_owned())
            .unwrap_or_default()
    }
}
