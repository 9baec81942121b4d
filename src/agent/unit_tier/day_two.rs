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
