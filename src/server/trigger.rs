//! `bento trigger`: start a host's agent run now instead of at its next timer. For each
//! host, the admin's trigger command (an argv, never a shell string) runs with `{host}`,
//! `{address}` and `{unit}` replaced, a bounded number at once, each with a timeout. By
//! default that is the system's `ssh` to the host's address running
//! `systemctl start --no-block bento-agent.service` (`bento-agent-retry.service` with
//! `--retry`). One host that cannot be reached never stops the others.

use std::io::{Read as _, Seek as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;
use wait_timeout::ChildExt as _;

use crate::protocol::HostName;
use crate::server::fleet::FleetConfig;

/// The unit the agent's timer starts (the NixOS module's).
pub const UNIT: &str = "bento-agent.service";
/// The unit that runs `bento agent update --force`: also retries a version the host backed
/// off from or rolled back (the NixOS agent module must define it; see docs/operators.md).
pub const RETRY_UNIT: &str = "bento-agent-retry.service";
/// Set in the trigger command's environment: `1` with `--retry`, else `0`.
pub const RETRY_ENV: &str = "BENTO_TRIGGER_RETRY";

/// The default `[server] trigger_command`.
pub fn default_command() -> Vec<String> {
    [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
        "--",
        "{address}",
        "systemctl",
        "start",
        "--no-block",
        "{unit}",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// ssh's exit status when it could not connect or authenticate.
const SSH_FAILED: i32 = 255;
/// At most this much of the command's output is kept for messages.
const OUTPUT_TAIL: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("[server] trigger_command is empty")]
    Empty,
    #[error(
        "host {host}: address {address:?} cannot start with '-' (it would be read as an option)"
    )]
    BadAddress { host: HostName, address: String },
}

/// A host to trigger and where it is.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: HostName,
    /// `[hosts.NAME] address`, else the host's name.
    pub address: String,
}

pub fn targets(config: &FleetConfig, hosts: &[HostName]) -> Result<Vec<Target>, TriggerError> {
    hosts
        .iter()
        .map(|h| {
            let address = config
                .hosts
                .get(h)
                .and_then(|c| c.address.clone())
                .unwrap_or_else(|| h.to_string());
            if address.starts_with('-') {
                return Err(TriggerError::BadAddress {
                    host: h.clone(),
                    address,
                });
            }
            Ok(Target {
                host: h.clone(),
                address,
            })
        })
        .collect()
}

/// The argv for one host: placeholders replaced inside every argument.
pub fn argv(
    template: &[String],
    target: &Target,
    retry: bool,
) -> Result<Vec<String>, TriggerError> {
    if template.is_empty() {
        return Err(TriggerError::Empty);
    }
    let unit = if retry { RETRY_UNIT } else { UNIT };
    Ok(template
        .iter()
        .map(|a| {
            a.replace("{host}", target.host.as_str())
                .replace("{address}", &target.address)
                .replace("{unit}", unit)
        })
        .collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The command exited 0: the run is started (or already running).
    Started,
    /// ssh could not reach the host (exit 255), the command could not run, or it timed out.
    Unreachable,
    /// The command ran and exited non-zero.
    Failed,
}

/// What triggering one host did.
#[derive(Debug, Clone, Serialize)]
pub struct Triggered {
    pub host: HostName,
    pub outcome: Outcome,
    pub argv: Vec<String>,
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    /// Why it was not started, with the end of the command's output.
    pub error: Option<String>,
}

/// Runs one argv with a timeout; its output (stdout and stderr together) goes to a
/// temporary file, so a chatty command can never block on a full pipe.
fn run_one(host: &HostName, argv: Vec<String>, retry: bool, timeout: Duration) -> Triggered {
    let started = Instant::now();
    let done = |outcome, exit_code, error: Option<String>| Triggered {
        host: host.clone(),
        outcome,
        argv: argv.clone(),
        exit_code,
        duration_ms: started.elapsed().as_millis() as u64,
        error,
    };
    let out = match tempfile::tempfile() {
        Ok(f) => f,
        Err(e) => {
            return done(
                Outcome::Unreachable,
                None,
                Some(format!("temporary file: {e}")),
            )
        }
    };
    let spawned = out.try_clone().and_then(|err| {
        Command::new(&argv[0])
            .args(&argv[1..])
            .env(RETRY_ENV, if retry { "1" } else { "0" })
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(err)
            .spawn()
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return done(
                Outcome::Unreachable,
                None,
                Some(format!("cannot run {}: {e}", argv[0])),
            )
        }
    };
    let status = match child.wait_timeout(timeout) {
        Ok(Some(s)) => s,
        Ok(None) | Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return done(
                Outcome::Unreachable,
                None,
                Some(format!(
                    "{} did not finish within {}",
                    argv[0],
                    humantime::format_duration(timeout)
                )),
            );
        }
    };
    let tail = output_tail(out);
    match status.code() {
        Some(0) => done(Outcome::Started, Some(0), None),
        Some(code) => {
            let outcome = if code == SSH_FAILED && argv[0].ends_with("ssh") {
                Outcome::Unreachable
            } else {
                Outcome::Failed
            };
            let msg = format!("{} exited with {code}{}", argv[0], tail);
            done(outcome, Some(code), Some(msg))
        }
        None => done(
            Outcome::Failed,
            None,
            Some(format!("{} was killed by a signal{tail}", argv[0])),
        ),
    }
}

/// The end of the command's output, as `: <last line>` (control characters dropped).
fn output_tail(mut file: std::fs::File) -> String {
    let mut text = String::new();
    let _ = file.rewind();
    let _ = file.take(1 << 20).read_to_string(&mut text);
    let clean: String = text
        .trim()
        .chars()
        .map(|c| {
            if c == '\n' {
                '\n'
            } else if c.is_control() {
                ' '
            } else {
                c
            }
        })
        .collect();
    let start = clean.len().saturating_sub(OUTPUT_TAIL);
    let start = (start..=clean.len())
        .find(|i| clean.is_char_boundary(*i))
        .unwrap_or(0);
    let tail = clean[start..]
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_owned();
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {tail}")
    }
}

/// Triggers every target, `jobs` at once; `on_done` sees each as it finishes. Results are
/// in target order.
pub fn run_all(
    template: &[String],
    targets: &[Target],
    retry: bool,
    jobs: usize,
    timeout: Duration,
    on_done: &(dyn Fn(&Triggered) + Sync),
) -> Result<Vec<Triggered>, TriggerError> {
    let argvs: Vec<Vec<String>> = targets
        .iter()
        .map(|t| argv(template, t, retry))
        .collect::<Result<_, _>>()?;
    let work = || -> Vec<Triggered> {
        targets
            .par_iter()
            .zip(argvs)
            .map(|(t, a)| {
                let r = run_one(&t.host, a, retry, timeout);
                on_done(&r);
                r
            })
            .collect()
    };
    Ok(
        match rayon::ThreadPoolBuilder::new()
            .num_threads(jobs.max(1))
            .build()
        {
            Ok(pool) => pool.install(work),
            Err(_) => work(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(h: &str, a: &str) -> Target {
        Target {
            host: HostName::new(h).unwrap(),
            address: a.to_owned(),
        }
    }

    #[test]
    fn placeholders_and_addresses() {
        let t = target("web-1", "10.0.0.5");
        let a = argv(&default_command(), &t, false).unwrap();
        assert_eq!(&a[..2], ["ssh", "-o"]);
        assert_eq!(
            a[6..],
            ["10.0.0.5", "systemctl", "start", "--no-block", UNIT]
        );
        let a = argv(&default_command(), &t, true).unwrap();
        assert_eq!(a.last().unwrap(), RETRY_UNIT);
        let custom: Vec<String> = ["run", "--host={host}", "{address}:22"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            argv(&custom, &t, false).unwrap(),
            ["run", "--host=web-1", "10.0.0.5:22"]
        );
        assert!(matches!(argv(&[], &t, false), Err(TriggerError::Empty)));

        let c = FleetConfig::parse(
            "[hosts.a]\naddress = \"10.0.0.5\"\n[hosts.b]\n[hosts.c]\naddress = \"-oProxyCommand=x\"\n",
            std::path::Path::new("bento.toml"),
        )
        .unwrap();
        let names = |n: &[&str]| {
            n.iter()
                .map(|x| HostName::new(x).unwrap())
                .collect::<Vec<_>>()
        };
        let ts = targets(&c, &names(&["a", "b"])).unwrap();
        assert_eq!(
            (ts[0].address.as_str(), ts[1].address.as_str()),
            ("10.0.0.5", "b")
        );
        let err = targets(&c, &names(&["c"])).unwrap_err().to_string();
        assert!(err.contains("host c"), "{err}");
    }

    #[test]
    fn outcomes_of_real_commands_in_parallel_and_bounded() {
        let sh = |script: &str| -> Vec<String> {
            ["/bin/sh", "-c", script, "sh", "{host}"]
                .map(String::from)
                .to_vec()
        };
        let ts = vec![target("ok", "x"), target("bad", "x"), target("slow", "x")];
        let template = sh(
            "case $1 in ok) test \"$BENTO_TRIGGER_RETRY\" = 1 ;; bad) echo 'no such unit' >&2; exit 5 ;; slow) sleep 30 ;; esac",
        );
        let started = Instant::now();
        let seen = std::sync::Mutex::new(Vec::new());
        let r = run_all(&template, &ts, true, 2, Duration::from_millis(500), &|t| {
            seen.lock().unwrap().push(t.host.to_string())
        })
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(seen.lock().unwrap().len(), 3);
        assert_eq!(r[0].outcome, Outcome::Started);
        assert_eq!(r[1].outcome, Outcome::Failed);
        assert_eq!(r[1].exit_code, Some(5));
        assert!(
            r[1].error.as_deref().unwrap().ends_with(": no such unit"),
            "{:?}",
            r[1].error
        );
        assert_eq!(r[2].outcome, Outcome::Unreachable);
        assert!(r[2].error.as_deref().unwrap().contains("did not finish"));
        let missing = vec!["/nonexistent/trigger".to_owned()];
        let r = run_all(
            &missing,
            &ts[..1],
            false,
            1,
            Duration::from_secs(5),
            &|_| {},
        )
        .unwrap();
        assert_eq!(r[0].outcome, Outcome::Unreachable);
        assert!(r[0]
            .error
            .as_deref()
            .unwrap()
            .contains("/nonexistent/trigger"));
    }
}
