//! The agent's unit tier: every branch of `bento agent update` driven end to end through a
//! [`FakeHost`] and a `file://` chroot in a temp directory — no sshd, no Nix, no root (CI
//! runs these as `nobody`: scripts/test.sh). Each test asserts what a user relies on: the
//! run's outcome and exit status, the report the server receives, the state left behind,
//! and exactly what the machine was asked to do.

mod checks;
mod contact;
mod day_two;
mod fake;
mod freshness;
mod mirrors;
mod substitute;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use self::fake::{store_path, FakeHost, SYSTEM_FILE};
use super::source::{self, Connection, RemoteError};
use super::state::{State, StateDir};
use super::{update, AgentConfig, AgentError, RunResult, UpdateOptions};
use crate::protocol::manifest::{Build, ConfigEntry, Digest, Manifest, RelPath};
use crate::protocol::report::{Heartbeat, Outcome, Report, RunKind};
use crate::protocol::{layout, HostName, Timestamp};

/// A host's chroot and state directory in temp dirs, a fake machine and a settable clock.
struct Bed {
    _tmp: tempfile::TempDir,
    chroot: PathBuf,
    cfg: AgentConfig,
    host: FakeHost,
    now: Cell<SystemTime>,
    published: Cell<u64>,
    /// Every source a run connected to, in order (`file://` paths).
    connects: std::cell::RefCell<Vec<String>>,
}

impl Bed {
    fn new(extra_toml: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let chroot = tmp.path().join("chroot");
        for d in [layout::MANIFESTS, layout::OBJECTS, layout::LOGS] {
            std::fs::create_dir_all(chroot.join(d)).unwrap();
        }
        let text = format!(
            "host = \"alpha\"\nserver = \"file://{}\"\nstate_dir = \"{}\"\nfiles_root = \"{}\"\nconfirm_timeout = \"0s\"\n{extra_toml}",
            chroot.display(),
            tmp.path().join("state").display(),
            tmp.path().join("root").display(),
        );
        let cfg = AgentConfig::parse(&text, Path::new("agent.toml")).unwrap();
        Bed {
            chroot,
            cfg,
            host: FakeHost::default(),
            now: Cell::new(UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
            published: Cell::new(0),
            connects: Default::default(),
            _tmp: tmp,
        }
    }

    /// Publishes a flake version whose tree builds to `system` (created `created_offset`
    /// seconds after the first publish).
    fn publish_at(&self, system: &str, created_offset: u64) -> Digest {
        self.publish_numbered(system, created_offset, 0)
    }

    /// As `publish_at`, with the manifest's `serial` (0: a manifest from before serials).
    fn publish_numbered(&self, system: &str, created_offset: u64, serial: u64) -> Digest {
        let mut config = Vec::new();
        for (path, body) in [
            ("flake.nix", format!("{{ }} # {system}\n")),
            (SYSTEM_FILE, system.to_owned()),
        ] {
            let digest = Digest::of(body.as_bytes());
            std::fs::write(layout::object(&self.chroot, &digest), &body).unwrap();
            config.push(ConfigEntry::File {
                path: RelPath::new(path).unwrap(),
                size: body.len() as u64,
                sha256: digest,
                executable: false,
            });
        }
        let created = UNIX_EPOCH + Duration::from_secs(1_795_000_000 + created_offset);
        let mut m = Manifest {
            format: 1,
            host: HostName::new("alpha").unwrap(),
            created: Timestamp::millis(created),
            serial,
            source_commit: None,
            dirty: false,
            build: Build::Flake,
            system: None,
            config,
            tree: None,
            files: Vec::new(),
        };
        m.canonicalize();
        let bytes = m.to_bytes();
        let digest = Digest::of(&bytes);
        std::fs::write(layout::manifest(&self.chroot, &digest), &bytes).unwrap();
        std::fs::write(layout::current(&self.chroot), layout::current_text(&digest)).unwrap();
        digest
    }

    fn publish(&self, system: &str) -> Digest {
        self.published.set(self.published.get() + 1);
        self.publish_at(system, self.published.get())
    }

    fn run_with(&self, force: bool) -> RunResult {
        self.try_run(force).unwrap()
    }

    fn try_run(&self, force: bool) -> Result<RunResult, AgentError> {
        let down = self.host.server_down.clone();
        let connect = move |url: &source::ServerUrl,
                            _: source::Purpose|
              -> Result<Box<dyn Connection>, RemoteError> {
            self.connects.borrow_mut().push(url.to_string());
            if down.get() && url == &self.cfg.server {
                return Err(RemoteError::Connect {
                    server: "file://test".into(),
                    message: "unreachable".into(),
                });
            }
            source::connect(url, &self.cfg.ssh_options())
        };
        let now = || self.now.get();
        update(&UpdateOptions {
            config: &self.cfg,
            host: &self.host,
            connect: &connect,
            now: &now,
            force,
            on_wait: &|| {},
            on_progress: &|_| {},
        })
    }

    fn run(&self) -> RunResult {
        self.run_with(false)
    }

    fn later(&self, secs: u64) {
        self.now.set(self.now.get() + Duration::from_secs(secs));
    }

    fn state(&self) -> State {
        StateDir::new(&self.cfg.state_dir).load().unwrap()
    }

    /// The newest report on the server.
    fn latest(&self) -> Option<Report> {
        let bytes = std::fs::read(self.chroot.join("logs/latest.json")).ok()?;
        Some(Report::parse(&bytes).unwrap())
    }

    fn heartbeat(&self) -> Heartbeat {
        Heartbeat::parse(&std::fs::read(self.chroot.join("logs/heartbeat.json")).unwrap()).unwrap()
    }

    fn spooled(&self) -> usize {
        std::fs::read_dir(StateDir::new(&self.cfg.state_dir).spool())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json"))
            })
            .count()
    }

    /// Everything the machine was asked to do since the last call.
    fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.host.calls.borrow_mut())
    }
}

fn name(r: &Option<String>) -> &str {
    r.as_deref()
        .and_then(|p| p.rsplit_once("-nixos-system-"))
        .map_or("-", |(_, n)| n)
}

#[test]
fn agent_applies_a_new_version_and_reports_success() {
    let bed = Bed::new("");
    *bed.host.running.borrow_mut() = Some(store_path("old"));
    let v1 = bed.publish("one");
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_UPDATED, "{r:?}");
    assert_eq!(
        bed.take_calls(),
        [
            "realise one",
            "set_profile nixos-system-one",
            "activate nixos-system-one switch"
        ]
    );
    let report = bed.latest().expect("a report on the server");
    assert_eq!((report.outcome, report.version), (Outcome::Success, v1));
    assert_eq!(name(&report.system_before), "old");
    assert_eq!(name(&report.built_system), "one");
    assert_eq!(name(&report.system_after), "one");
    let state = bed.state();
    assert_eq!(state.applied.as_ref().map(|a| a.version), Some(v1));
    assert_eq!(bed.spooled(), 0, "the delivered report left the spool");
    let hb = bed.heartbeat();
    assert_eq!(
        (hb.version, hb.last_outcome),
        (Some(v1), Some(Outcome::Success))
    );
}

#[test]
fn agent_noop_when_up_to_date_touches_nothing_but_the_heartbeat() {
    let bed = Bed::new("");
    assert!(
        matches!(bed.run(), RunResult::NoOp { reason } if reason.contains("nothing is published"))
    );
    let v1 = bed.publish("one");
    bed.run();
    bed.take_calls();
    let before = bed.latest().unwrap().id;
    bed.later(60);
    let r = bed.run();
    assert!(
        matches!(&r, RunResult::NoOp { reason } if reason.contains("up to date")),
        "{r:?}"
    );
    assert_eq!(r.exit_code(), RunResult::EXIT_NOOP);
    assert_eq!(
        bed.take_calls(),
        Vec::<String>::new(),
        "a no-op asked the machine to act"
    );
    assert_eq!(bed.latest().unwrap().id, before, "a no-op wrote a report");
    let hb = bed.heartbeat();
    assert_eq!(hb.version, Some(v1));
    assert_eq!(hb.time, Timestamp::seconds(bed.now.get()));
}

#[test]
fn agent_build_failure_changes_nothing_and_backs_off() {
    let bed = Bed::new("notify = [\"/bin/mail\", \"root\"]\n");
    *bed.host.running.borrow_mut() = Some(store_path("old"));
    let bad = bed.publish("fail");
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_FAILED, "{r:?}");
    assert_eq!(
        bed.take_calls(),
        ["realise fail", "notify /bin/mail root failure"]
    );
    let report = bed.latest().unwrap();
    assert_eq!(report.outcome, Outcome::Failure);
    assert!(
        report.error.as_deref().unwrap().contains("build failed"),
        "{report:?}"
    );
    assert_eq!(
        bed.state().failures.as_ref().map(|f| (f.version, f.count)),
        Some((bad, 1))
    );

    // Back-off: the next timer run does not try again…
    bed.later(60);
    let r = bed.run();
    assert!(
        matches!(&r, RunResult::NoOp { reason } if reason.contains("retrying in")),
        "{r:?}"
    );
    assert_eq!(bed.take_calls(), Vec::<String>::new());
    // …until 5 minutes have passed, or with --force.
    assert_eq!(bed.run_with(true).exit_code(), RunResult::EXIT_FAILED);
    assert_eq!(bed.state().failures.unwrap().count, 2);
    bed.later(10 * 60 + 1);
    assert_eq!(bed.run().exit_code(), RunResult::EXIT_FAILED);
    // A newer version is tried at once.
    bed.take_calls();
    bed.publish("two");
    assert_eq!(bed.run().exit_code(), RunResult::EXIT_UPDATED);
    assert_eq!(bed.state().failures, None);
}

#[test]
fn agent_activation_failure_restores_the_previous_system() {
    let bed = Bed::new("");
    *bed.host.running.borrow_mut() = Some(store_path("old"));
    bed.host.fail_activation.set(true);
    bed.publish("one");
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_FAILED, "{r:?}");
    assert_eq!(
        bed.take_calls(),
        [
            "realise one",
            "set_profile nixos-system-one",
            "activate nixos-system-one switch",
            "set_profile nixos-system-old",
            "activate nixos-system-old switch",
        ]
    );
    let report = bed.latest().unwrap();
    assert!(
        report
            .error
            .as_deref()
            .unwrap()
            .contains("activation failed"),
        "{report:?}"
    );
    assert!(
        report.error.as_deref().unwrap().contains("back on"),
        "{report:?}"
    );
    assert_eq!(bed.state().applied, None);
}

#[test]
fn agent_rolls_back_when_the_server_is_lost_after_activation() {
    let bed = Bed::new("notify = [\"/bin/mail\"]\n");
    *bed.host.running.borrow_mut() = Some(store_path("old"));
    bed.host.breaks_network.set(true);
    let v1 = bed.publish("one");
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_ROLLED_BACK, "{r:?}");
    assert_eq!(
        bed.take_calls(),
        [
            "realise one",
            "set_profile nixos-system-one",
            "activate nixos-system-one switch",
            // The exact store path that ran before, not "one generation down".
            "set_profile nixos-system-old",
            "activate nixos-system-old switch",
            "notify /bin/mail rollback",
        ]
    );
    assert_eq!(bed.host.running_name(), "nixos-system-old");
    assert!(bed.state().rolled_back.contains(&v1));
    // The report could not be delivered: it waits in the spool…
    assert_eq!(bed.latest(), None);
    assert_eq!(bed.spooled(), 1);
    // …and the next run that reaches the server delivers it, and does not retry v1.
    bed.host.breaks_network.set(false);
    bed.host.server_down.set(false);
    let r = bed.run();
    assert!(
        matches!(&r, RunResult::NoOp { reason } if reason.contains("rolled back")),
        "{r:?}"
    );
    assert_eq!(bed.latest().unwrap().outcome, Outcome::Rollback);
    assert_eq!(bed.spooled(), 0);
    assert_eq!(bed.take_calls(), Vec::<String>::new());
}

#[test]
fn agent_refuses_a_replayed_older_manifest() {
    let bed = Bed::new("");
    let v1 = bed.publish_at("one", 100);
    assert_eq!(bed.run().exit_code(), RunResult::EXIT_UPDATED);
    bed.take_calls();
    // An attacker with write access to the chroot puts back an older snapshot.
    let old = bed.publish_at("vulnerable", 50);
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_FAILED, "{r:?}");
    let report = bed.latest().unwrap();
    assert_eq!(report.version, old);
    assert!(
        report.error.as_deref().unwrap().contains("replayed"),
        "{report:?}"
    );
    assert_eq!(
        bed.take_calls(),
        Vec::<String>::new(),
        "a replay reached the machine"
    );
    assert_eq!(bed.state().applied.unwrap().version, v1);
}

/// Issue #14 item 7: versions are ordered by serial; a clock that ran ahead at one publish
/// does not lock the host out, and an older serial is still a replay.
#[test]
fn agent_orders_versions_by_serial_not_by_clock() {
    let bed = Bed::new("");
    let decade = 10 * 365 * 24 * 3600;
    // Published by a machine whose clock ran ten years ahead.
    let ahead = bed.publish_numbered("one", decade, 1);
    assert_eq!(bed.run().exit_code(), RunResult::EXIT_UPDATED);
    let next = bed.publish_numbered("two", 0, 2);
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_UPDATED, "{r:?}");
    let applied = bed.state().applied.unwrap();
    assert_eq!((applied.version, applied.serial), (next, Some(2)));
    bed.take_calls();
    // The server puts back serial 1 (newer by its clock): a replay.
    std::fs::write(layout::current(&bed.chroot), layout::current_text(&ahead)).unwrap();
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_FAILED, "{r:?}");
    let error = bed.latest().unwrap().error.unwrap();
    assert!(
        error.contains("serial 1") && error.contains("replayed"),
        "{error}"
    );
    assert_eq!(
        bed.take_calls(),
        Vec::<String>::new(),
        "a replay reached the machine"
    );
    // A manifest from before serials after one with a serial is a replay too.
    bed.publish_numbered("old", 2 * decade, 0);
    assert_eq!(bed.run().exit_code(), RunResult::EXIT_FAILED);
    assert!(bed.latest().unwrap().error.unwrap().contains("no serial"));
    assert_eq!(bed.state().applied.unwrap().version, next);
}

#[test]
fn agent_self_updates_when_an_input_moved() {
    let bed = Bed::new("self_update = true\n");
    let v1 = bed.publish("one");
    bed.run();
    bed.take_calls();
    // Nothing moved: a no-op, and no second try within the day.
    assert!(
        matches!(bed.run(), RunResult::NoOp { reason } if reason.contains("no flake input moved"))
    );
    assert_eq!(bed.take_calls(), ["relock"]);
    bed.later(3600);
    assert!(matches!(bed.run(), RunResult::NoOp { .. }));
    assert_eq!(bed.take_calls(), Vec::<String>::new());
    // A day later an input moved: the new system is applied and reported as auto-updated.
    *bed.host.relock_to.borrow_mut() = Some("one-relocked".into());
    bed.later(24 * 3600);
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_UPDATED, "{r:?}");
    assert_eq!(
        bed.take_calls(),
        [
            "relock",
            "realise one-relocked",
            "set_profile nixos-system-one-relocked",
            "activate nixos-system-one-relocked switch",
        ]
    );
    let report = bed.latest().unwrap();
    assert_eq!((report.kind, report.version), (RunKind::AutoUpdated, v1));
    assert!(bed.heartbeat().auto_updated);
    // The applied tree itself was not changed.
    let tree = StateDir::new(&bed.cfg.state_dir).config().join(v1.to_hex());
    assert_eq!(
        std::fs::read_to_string(tree.join(SYSTEM_FILE)).unwrap(),
        "one"
    );
}

#[test]
fn agent_reboots_only_when_the_kernel_changed_and_the_policy_says_so() {
    for (policy, expected) in [
        ("never", None),
        ("when-needed", Some("schedule_reboot 03:30")),
        ("when-needed-now", Some("reboot_now")),
    ] {
        let bed = Bed::new(&format!("reboot = \"{policy}\"\nreboot_at = \"03:30\"\n"));
        *bed.host.running.borrow_mut() = Some(store_path("old"));
        *bed.host.booted.borrow_mut() = Some(store_path("old"));
        // Same kernel: no reboot, whatever the policy.
        bed.publish("one");
        assert_eq!(bed.run().exit_code(), RunResult::EXIT_UPDATED);
        assert!(!bed.latest().unwrap().reboot_required);
        assert!(
            !bed.take_calls().iter().any(|c| c.contains("reboot")),
            "{policy}"
        );
        // A new kernel.
        bed.host
            .kernels
            .borrow_mut()
            .insert(store_path("two"), "6.2".into());
        bed.publish("two");
        assert_eq!(bed.run().exit_code(), RunResult::EXIT_UPDATED);
        assert!(bed.latest().unwrap().reboot_required, "{policy}");
        assert!(bed.heartbeat().reboot_pending, "{policy}");
        let reboots: Vec<String> = bed
            .take_calls()
            .into_iter()
            .filter(|c| c.contains("reboot"))
            .collect();
        assert_eq!(
            reboots,
            expected.into_iter().collect::<Vec<_>>(),
            "{policy}"
        );
    }
}

#[test]
fn agent_boot_mode_activates_at_next_boot_without_confirming() {
    // `boot` changes nothing that runs, so there is nothing to confirm and no rollback even
    // with the server gone.
    let bed = Bed::new("mode = \"boot\"\n");
    *bed.host.running.borrow_mut() = Some(store_path("old"));
    bed.host.breaks_network.set(true);
    bed.publish("one");
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_UPDATED, "{r:?}");
    assert_eq!(
        bed.take_calls(),
        [
            "realise one",
            "set_profile nixos-system-one",
            "activate nixos-system-one boot"
        ]
    );
}

#[test]
fn agent_with_a_full_state_dir_still_tells_the_server_it_failed() {
    let bed = Bed::new("");
    *bed.host.running.borrow_mut() = Some(store_path("old"));
    *bed.host.fill_disk.borrow_mut() = Some(bed.cfg.state_dir.clone());
    let v1 = bed.publish("fail");
    let err = bed.try_run(false).unwrap_err();
    // The run still fails for the state it could not keep…
    assert!(matches!(err, AgentError::State { .. }), "{err}");
    // …but the server learns that the host failed, and why.
    let report = bed
        .latest()
        .expect("the report reached the server from memory");
    assert_eq!((report.outcome, report.version), (Outcome::Failure, v1));
    assert!(
        report.error.as_deref().unwrap().contains("build failed"),
        "{report:?}"
    );
    let hb = bed.heartbeat();
    assert_eq!(hb.last_outcome, Some(Outcome::Failure));
    assert_eq!(hb.last_report, Some(report.id.clone()));
    assert!(bed
        .chroot
        .join(format!("logs/reports/{}.log.gz", report.id))
        .is_file());
}
