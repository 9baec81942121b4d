//! What the agent must hold to after day one (issue #24). Item 1, `mode = "test"`: like
//! `nixos-rebuild test`, the agent activates the new system without touching the profile,
//! and never reboots after it, whatever `reboot` says (a reboot would bring back the boot
//! default, and the next run would activate and reboot again at every timer tick). Item 10:
//! the agent runs only as the host the live manifest names.

use super::fake::store_path;
use super::Bed;
use crate::agent::RunResult;

#[test]
fn agent_test_mode_never_touches_the_profile_nor_reboots() {
    for policy in ["never", "when-needed", "when-needed-now"] {
        let bed = Bed::new(&format!("mode = \"test\"\nreboot = \"{policy}\"\n"));
        *bed.host.running.borrow_mut() = Some(store_path("old"));
        *bed.host.booted.borrow_mut() = Some(store_path("old"));
        // A new kernel: what would ask for a reboot in `switch` mode.
        bed.host
            .kernels
            .borrow_mut()
            .insert(store_path("one"), "6.2".into());
        bed.publish("one");
        let r = bed.run();
        assert_eq!(r.exit_code(), RunResult::EXIT_UPDATED, "{policy}: {r:?}");
        assert_eq!(
            bed.take_calls(),
            ["realise one", "activate nixos-system-one test"],
            "{policy}"
        );
        assert_eq!(bed.host.running_name(), "nixos-system-one");
        let report = bed.latest().unwrap();
        assert!(!report.reboot_required, "{policy}: {report:?}");
        assert!(!bed.heartbeat().reboot_pending, "{policy}");
        // The next timer run finds the test activation running: nothing to do, no reboot.
        bed.later(15 * 60);
        let r = bed.run();
        assert_eq!(r.exit_code(), RunResult::EXIT_NOOP, "{policy}: {r:?}");
        assert_eq!(bed.take_calls(), Vec::<String>::new(), "{policy}");
    }
}

#[test]
fn agent_test_mode_restores_without_touching_the_profile() {
    let bed = Bed::new("mode = \"test\"\n");
    *bed.host.running.borrow_mut() = Some(store_path("old"));
    bed.host.fail_activation.set(true);
    bed.publish("one");
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_FAILED, "{r:?}");
    assert_eq!(
        bed.take_calls(),
        [
            "realise one",
            "activate nixos-system-one test",
            "activate nixos-system-old test",
        ]
    );
    assert_eq!(bed.host.running_name(), "nixos-system-old");
}

/// Issue #24 item 10: an agent whose agent.toml names another host than the live manifest
/// is refused before it writes anything, on a no-op run as on a first install.
#[test]
fn agent_configured_as_another_host_is_refused_and_writes_nothing() {
    use crate::agent::AgentError;
    use crate::protocol::HostName;

    let mut bed = Bed::new("");
    let v1 = bed.publish("one");
    assert_eq!(bed.run().exit_code(), RunResult::EXIT_UPDATED);
    bed.take_calls();
    let logs = bed.chroot.join("logs");
    let snapshot = || -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = walk(&logs)
            .into_iter()
            .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
            .collect();
        files.sort();
        files
    };
    let before = snapshot();

    // The same machine, now configured as kiosk2: the live version is alpha's.
    bed.cfg.host = HostName::new("kiosk2").unwrap();
    bed.later(60);
    for _ in 0..2 {
        let err = bed.try_run(false).unwrap_err();
        assert!(matches!(err, AgentError::WrongHost { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("host = \"kiosk2\"")
                && msg.contains("host alpha's")
                && msg.contains(&v1.short()),
            "{msg}"
        );
        assert_eq!(snapshot(), before, "the refused run wrote into logs/");
        assert_eq!(bed.take_calls(), Vec::<String>::new());
    }
    // The state still says what this machine really applied.
    assert_eq!(bed.state().applied.unwrap().version, v1);

    // A fresh machine configured as kiosk2 on alpha's account: refused before the apply, so
    // no failure report lands in alpha's logs/ either.
    let mut fresh = Bed::new("");
    fresh.cfg.host = HostName::new("kiosk2").unwrap();
    fresh.publish("one");
    let err = fresh.try_run(false).unwrap_err();
    assert!(matches!(err, AgentError::WrongHost { .. }), "{err}");
    assert_eq!(
        walk(&fresh.chroot.join("logs")),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(fresh.take_calls(), Vec::<String>::new());
}

/// Every file under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
