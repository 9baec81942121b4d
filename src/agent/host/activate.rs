//! Activating a system the way nixos-rebuild does: `switch-to-configuration` in a transient
//! unit of its own under systemd, retried while another switch holds its lock.

use std::path::Path;

use super::ActivateError;
use crate::nix;
use crate::protocol::{Mode, StorePath};
use crate::sys::process::Cmd;

/// Runs `path/bin/switch-to-configuration MODE`; returns its output.
pub fn activate(path: &StorePath, mode: Mode) -> Result<String, ActivateError> {
    let program = Path::new(path.as_str()).join("bin/switch-to-configuration");
    let argv = activation_argv(&program, mode.as_str(), under_systemd());
    with_lock_retries(
        || run_activation(&argv),
        LOCK_RETRIES,
        LOCK_RETRY_DELAY,
        |attempt| {
            tracing::warn!(
                "switch-to-configuration is busy ({STC_LOCK} is held, by a nixos-rebuild?); \
                     retrying ({attempt}/{LOCK_RETRIES}) in {}s",
                LOCK_RETRY_DELAY.as_secs()
            )
        },
    )
}

/// switch-to-configuration's own lock. It refuses to run (it does not wait) while another
/// one holds it, e.g. a `nixos-rebuild switch` run by hand.
pub const STC_LOCK: &str = "/run/nixos/switch-to-configuration.lock";
/// How often an activation refused for that lock is tried again, and how long apart: a
/// minute in all, about what a switch takes.
pub const LOCK_RETRIES: u32 = 6;
pub const LOCK_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(10);
/// The transient unit activation runs in (nixos-rebuild uses
/// `nixos-rebuild-switch-to-configuration`): only one at a time.
pub const SWITCH_UNIT: &str = "bento-switch-to-configuration";

/// Whether activation can run in a unit of its own: systemd is the service manager and
/// `systemd-run` is on PATH.
fn under_systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
        && std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|dir| dir.join("systemd-run").is_file())
        })
}

/// The command that activates: under systemd, `switch-to-configuration` runs in a transient
/// service of its own, as nixos-rebuild runs it, so that a switch that stops or restarts
/// the agent's unit (or changes its cgroup) cannot kill the activation halfway. `--pipe`
/// keeps its output and exit status ours; `-E` passes on what it reads from the caller's
/// environment. Elsewhere (no systemd, the tests' toy systems) it runs directly.
pub fn activation_argv(program: &Path, mode: &str, systemd: bool) -> Vec<String> {
    let mut argv = Vec::new();
    if systemd {
        argv.extend(
            [
                "systemd-run",
                "-E",
                "LOCALE_ARCHIVE",
                "-E",
                "NIXOS_INSTALL_BOOTLOADER",
                "-E",
                "NIXOS_NO_CHECK",
                "--collect",
                "--no-ask-password",
                "--pipe",
                "--quiet",
                "--service-type=exec",
            ]
            .map(String::from),
        );
        argv.push(format!("--unit={SWITCH_UNIT}"));
    }
    argv.push(program.display().to_string());
    argv.push(mode.to_owned());
    argv
}

fn run_activation(argv: &[String]) -> Result<String, ActivateError> {
    let shown = argv.join(" ");
    let Some(cmd) = Cmd::from_argv(argv) else {
        return Err(ActivateError {
            argv: shown,
            status: "could not start".into(),
            output_tail: "empty command".into(),
            output: String::new(),
        });
    };
    // Its whole output goes into the run's log: stdout, then stderr.
    match cmd.run() {
        Ok(out) => Ok(out.stdout_text() + &out.stderr),
        Err(e) => {
            let output = String::from_utf8_lossy(&e.stdout).into_owned() + &e.stderr;
            Err(ActivateError {
                argv: shown,
                status: e.ended.to_string(),
                output_tail: nix::tail(&output, nix::STDERR_TAIL_LINES),
                output,
            })
        }
    }
}

/// Whether a failed activation was refused because another switch was running: both
/// switch-to-configuration implementations print "Could not acquire lock" (the Rust one
/// exits with the errno, 11; the Perl one dies with "Could not acquire lock - …"), and
/// systemd-run refuses a second unit of the same name while one runs.
pub fn switch_was_busy(err: &ActivateError) -> bool {
    err.output.contains("Could not acquire lock")
        || err
            .output
            .contains(&format!("Unit {SWITCH_UNIT}.service was already loaded"))
}

/// Runs `activate`, and again up to `retries` times, `delay` apart, while it fails only
/// because another switch holds the lock. Any other failure is returned at once.
pub fn with_lock_retries(
    mut activate: impl FnMut() -> Result<String, ActivateError>,
    retries: u32,
    delay: std::time::Duration,
    mut on_retry: impl FnMut(u32),
) -> Result<String, ActivateError> {
    let mut attempt = 0;
    loop {
        match activate() {
            Err(e) if attempt < retries && switch_was_busy(&e) => {
                attempt += 1;
                on_retry(attempt);
                std::thread::sleep(delay);
            }
            Err(mut e) if switch_was_busy(&e) => {
                e.output_tail.push_str(&format!(
                    "\n(another switch held {STC_LOCK} through {} attempts)",
                    retries + 1
                ));
                return Err(e);
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn under_systemd_activation_runs_in_its_own_unit_as_nixos_rebuild_does() {
        let program = Path::new("/nix/store/x-nixos-system/bin/switch-to-configuration");
        assert_eq!(
            activation_argv(program, "switch", true).join(" "),
            "systemd-run -E LOCALE_ARCHIVE -E NIXOS_INSTALL_BOOTLOADER -E NIXOS_NO_CHECK \
             --collect --no-ask-password --pipe --quiet --service-type=exec \
             --unit=bento-switch-to-configuration \
             /nix/store/x-nixos-system/bin/switch-to-configuration switch"
        );
        assert_eq!(
            activation_argv(program, "boot", false),
            [
                "/nix/store/x-nixos-system/bin/switch-to-configuration",
                "boot"
            ]
        );
    }

    fn failure(output: &str) -> ActivateError {
        ActivateError {
            argv: "stc switch".into(),
            status: "exit status: 11".into(),
            output_tail: output.into(),
            output: output.into(),
        }
    }

    #[test]
    fn a_held_lock_is_waited_out_a_bounded_number_of_times() {
        let mut calls = 0;
        let mut retries = Vec::new();
        let out = with_lock_retries(
            || {
                calls += 1;
                if calls < 3 {
                    Err(failure("Could not acquire lock\n"))
                } else {
                    Ok("activated".into())
                }
            },
            6,
            Duration::ZERO,
            |n| retries.push(n),
        );
        assert_eq!(out.unwrap(), "activated");
        assert_eq!((calls, retries), (3, vec![1, 2]));

        // Held throughout: given up after the retries, saying why.
        let mut calls = 0;
        let err = with_lock_retries(
            || {
                calls += 1;
                Err(failure(
                    "Could not acquire lock - Resource temporarily unavailable\n",
                ))
            },
            2,
            Duration::ZERO,
            |_| {},
        )
        .unwrap_err();
        assert_eq!(calls, 3);
        assert!(err.output_tail.contains(STC_LOCK), "{}", err.output_tail);
    }

    #[test]
    fn other_failures_are_not_retried() {
        let mut calls = 0;
        let err = with_lock_retries(
            || {
                calls += 1;
                Err(failure("Failed to start unit foo.service\n"))
            },
            6,
            Duration::ZERO,
            |_| {},
        )
        .unwrap_err();
        assert_eq!(calls, 1);
        assert!(!switch_was_busy(&err));
        assert!(switch_was_busy(&failure(
            "Failed to start transient service unit: Unit bento-switch-to-configuration.service was already loaded or has a fragment file."
        )));
    }
}
