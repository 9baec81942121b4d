//! `bento agent …`: the commands run on each NixOS machine.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use crate::agent::host::{Host, NixHost};
use crate::agent::state::StateDir;
use crate::agent::{self, AgentConfig, RunResult, UpdateOptions};
use crate::nix::Nix;
use crate::sys::output;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// On a new machine: make its SSH key if missing and print the line for the server's
    /// admin (`bento host add NAME --key '…'`)
    Init {
        /// The bento server this machine will pull from (e.g. sftp://bento.example.org, or
        /// its name), named in the instructions
        #[arg(long, value_name = "URL")]
        server: String,
        /// The machine's name in the fleet (default: its host name)
        #[arg(long, value_name = "NAME")]
        host: Option<String>,
        /// Where the machine's SSH key goes
        #[arg(long, value_name = "FILE", default_value = "/etc/bento/id_ed25519")]
        identity_file: PathBuf,
    },
    /// Check agent.toml, the key, the server's host key, the connection, the live
    /// manifest's signature and cache_keys; one line each, with the fix
    Check {
        /// The agent's settings
        #[arg(long, default_value = agent::config::DEFAULT_CONFIG, value_name = "FILE")]
        config: PathBuf,
        /// Print the findings as JSON
        #[arg(long)]
        json: bool,
    },
    /// Fetch, build and activate this machine's published configuration if it changed
    Update {
        /// The agent's settings
        #[arg(long, default_value = agent::config::DEFAULT_CONFIG, value_name = "FILE")]
        config: PathBuf,
        /// Retry a version that failed or was rolled back, now
        #[arg(long)]
        force: bool,
        /// Print what the run did as JSON (`result`, `reason` or the run's `report`)
        #[arg(long)]
        json: bool,
    },
    /// Show this machine's view: version applied, running system, last outcome
    Status {
        /// The agent's settings
        #[arg(long, default_value = agent::config::DEFAULT_CONFIG, value_name = "FILE")]
        config: PathBuf,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Serve the "Update my machine" page on loopback (socket-activated by systemd, or standalone)
    Serve {
        /// The agent's settings
        #[arg(long, default_value = agent::config::DEFAULT_CONFIG, value_name = "FILE")]
        config: PathBuf,
        /// Where to listen when systemd passes no socket (loopback addresses only)
        #[arg(long, default_value = agent::page::DEFAULT_LISTEN, value_name = "ADDR:PORT")]
        listen: std::net::SocketAddr,
        /// Exit after this long without a visitor or a running update (e.g. 10m)
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        exit_when_idle: Option<std::time::Duration>,
    },
    /// Write the systemd units the NixOS module defines (for systemd-analyze, or non-NixOS machines)
    PrintUnits {
        /// The settings file the units pass to the agent
        #[arg(long, default_value = agent::config::DEFAULT_CONFIG, value_name = "FILE")]
        config: PathBuf,
        /// The bento executable the units run (default: this one)
        #[arg(long, value_name = "PATH")]
        bento: Option<PathBuf>,
        /// The timer's OnCalendar= expression
        #[arg(long, default_value = agent::units::DEFAULT_INTERVAL, value_name = "CALENDAR")]
        interval: String,
        /// The timer's RandomizedDelaySec=
        #[arg(long, default_value = agent::units::DEFAULT_RANDOMIZED_DELAY, value_name = "DURATION")]
        randomized_delay: String,
        /// The page socket's ListenStream=
        #[arg(long, default_value = agent::page::DEFAULT_LISTEN, value_name = "ADDR:PORT")]
        listen: std::net::SocketAddr,
        /// Write one file per unit into DIR instead of printing them
        #[arg(long, short, value_name = "DIR")]
        output: Option<PathBuf>,
    },
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Init {
            server,
            host,
            identity_file,
        } => super::agent_enrol::init(&server, host, &identity_file),
        Command::Check { config, json } => super::agent_enrol::check(&config, json),
        Command::Update {
            config,
            force,
            json,
        } => update(&config, force, json),
        Command::Status { config, json } => status(&config, json),
        Command::Serve {
            config,
            listen,
            exit_when_idle,
        } => {
            let runner = std::sync::Arc::new(agent::page::AgentRunner {
                config_path: config.clone(),
            });
            let opts = agent::page::ServeOptions {
                config_path: config,
                listen,
                exit_when_idle,
                on_listening: &|url| output::line(url),
            };
            agent::page::serve(&opts, runner)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::PrintUnits {
            config,
            bento,
            interval,
            randomized_delay,
            listen,
            output: dir,
        } => {
            let bento = match bento {
                Some(b) => b,
                None => std::env::current_exe().context("locating the bento executable")?,
            };
            let opts = agent::units::UnitOptions {
                bento,
                config,
                interval,
                randomized_delay,
                listen,
            };
            match dir {
                Some(dir) => {
                    for path in agent::units::write(&opts, &dir)
                        .with_context(|| format!("writing units into {}", dir.display()))?
                    {
                        output::line(&path.display().to_string());
                    }
                }
                None => {
                    for (name, text) in agent::units::render(&opts) {
                        output::line(&format!("# {name}\n{text}"));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn update(config: &std::path::Path, force: bool, json: bool) -> anyhow::Result<ExitCode> {
    // It switches the system, writes the profile and the state directory: say so first,
    // not as whichever permission error comes first.
    if !crate::sys::accounts::is_root() {
        anyhow::bail!(
            "bento agent update switches this machine's system (its profile, activation and state) and must run as root: run `sudo bento agent update`, or start the service: `systemctl start bento-agent`"
        );
    }
    let cfg = AgentConfig::load(config)?;
    let host = NixHost::new(Nix::default().with_timeout(cfg.run_timeout), &cfg);
    let connect = cfg.run_connector();
    let lock = StateDir::new(&cfg.state_dir).lock();
    let on_wait = || {
        output::note(&format!(
            "another `bento agent update` holds {}; waiting for it",
            lock.display()
        ))
    };
    let result = agent::update(&UpdateOptions {
        config: &cfg,
        host: &host,
        connect: &connect,
        now: &std::time::SystemTime::now,
        force,
        on_wait: &on_wait,
        on_progress: &|_| {},
    })
    .with_context(|| format!("updating host {} from {}", cfg.host, cfg.server))?;
    if json {
        let (word, reason, report) = match &result {
            RunResult::NoOp { reason } => ("nothing-to-do", Some(reason.as_str()), None),
            RunResult::Updated(r) if r.same_system() => ("unchanged", Some("same system"), Some(r)),
            RunResult::Updated(r) => ("updated", None, Some(r)),
            RunResult::Failed(r) => ("failed", None, Some(r)),
            RunResult::RolledBack(r) => ("rolled-back", None, Some(r)),
            RunResult::Stale { reason } => ("stale", Some(reason.as_str()), None),
        };
        output::json(&serde_json::json!({
            "result": word,
            "reason": reason,
            "report": report,
        }))?;
        return Ok(ExitCode::from(result.exit_code()));
    }
    match &result {
        RunResult::NoOp { reason } => output::line(&format!("nothing to do: {reason}")),
        RunResult::Updated(r) if r.same_system() => output::line(&format!(
            "unchanged (same system): applied version {}, which runs the system already running ({})",
            r.version.short(),
            r.built_system.as_deref().unwrap_or("-")
        )),
        RunResult::Updated(r) => output::line(&format!(
            "updated to version {} ({})",
            r.version.short(),
            r.built_system.as_deref().unwrap_or("-")
        )),
        RunResult::Failed(r) => output::line(&format!(
            "failed to apply version {}: {}",
            r.version.short(),
            r.error.as_deref().unwrap_or("-")
        )),
        RunResult::RolledBack(r) => output::line(&format!(
            "rolled back from version {}: {}",
            r.version.short(),
            r.error.as_deref().unwrap_or("-")
        )),
        RunResult::Stale { reason } => output::line(&format!("stale, nothing changed: {reason}")),
    }
    Ok(ExitCode::from(result.exit_code()))
}

fn status(config: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = AgentConfig::load(config)?;
    let dirs = StateDir::new(&cfg.state_dir);
    let state = dirs
        .load()
        .with_context(|| format!("reading {}", dirs.state_file().display()))?;
    let running = NixHost::new(Nix::default(), &cfg).running().ok().flatten();
    let next = next_timer_run();
    let when = |s: u64| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
            .to_string()
    };
    if json {
        output::json(&serde_json::json!({
            "host": cfg.host,
            "server": cfg.server.to_string(),
            "applied_version": state.applied.as_ref().map(|a| a.version),
            "applied_system": state.applied.as_ref().map(|a| a.system.to_string()),
            "running_system": running.as_ref().map(|r| r.to_string()),
            "last_outcome": state.last.as_ref().map(|l| l.outcome),
            "last_run": state.last.as_ref().map(|l| when(l.finished)),
            "last_error": state.last.as_ref().and_then(|l| l.error.clone()),
            "rolled_back": state.rolled_back,
            "reboot_pending": state.reboot_pending,
            "verifies_signatures": !cfg.trusted_keys.is_empty(),
            "freshness": freshness_word(&state),
            "fresh_until": state.fresh.as_ref().map(|f| f.not_after.as_str()),
            "stale": state.stale.as_ref().map(|s| serde_json::json!({
                "since": when(s.since),
                "reason": s.reason,
            })),
            "unreachable": state.unreachable.as_ref().map(|u| serde_json::json!({
                "since": when(u.since),
                "at": when(u.at),
                "runs": u.runs,
                "error": u.error,
            })),
            "next_run": next,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        ("host", cfg.host.to_string()),
        ("server", cfg.server.to_string()),
        (
            "applied",
            state.applied.as_ref().map_or("nothing yet".into(), |a| {
                format!(
                    "version {} ({}) at {}",
                    a.version.short(),
                    a.system,
                    when(a.at)
                )
            }),
        ),
        (
            "running",
            running.as_ref().map_or("unknown".into(), |r| r.to_string()),
        ),
        (
            "last run",
            state.last.as_ref().map_or("never".into(), |l| {
                let err = l
                    .error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                format!(
                    "{} of version {} at {}{err}",
                    l.outcome.as_str(),
                    l.version.short(),
                    when(l.finished)
                )
            }),
        ),
    ];
    // The runs since the last that reached the server: "last run" alone would go on
    // showing that one's success.
    if let Some(u) = &state.unreachable {
        let runs = match u.runs {
            1 => "1 run".to_owned(),
            n => format!("{n} runs since {}", when(u.since)),
        };
        rows.push((
            "contact",
            format!(
                "server unreachable ({runs}), last tried at {}: {}",
                when(u.at),
                crate::sys::terminal::escape(&u.error)
            ),
        ));
    }
    rows.push((
        "freshness",
        match (&state.stale, &state.fresh) {
            (Some(s), _) => format!(
                "stale since {}: {}",
                when(s.since),
                crate::sys::terminal::escape(&s.reason)
            ),
            (None, Some(f)) => format!(
                "fresh: version {} vouched for until {}",
                f.version.short(),
                f.not_after
            ),
            (None, None) => {
                "unchecked: no freshness stamp accepted (the fleet sets no [server] freshness, or none was needed yet)".to_owned()
            }
        },
    ));
    rows.extend([
        (
            "reboot",
            if state.reboot_pending {
                "pending: the applied system boots another kernel or initrd".to_owned()
            } else {
                "not needed".to_owned()
            },
        ),
        (
            "signing",
            match cfg.trusted_keys.len() {
                0 => format!(
                    "not verified: no trusted_keys in {}, so manifests are applied unsigned",
                    config.display()
                ),
                n => format!("manifests must be signed by one of {n} trusted keys"),
            },
        ),
        (
            "next run",
            next.unwrap_or_else(|| "unknown (no systemd timer)".into()),
        ),
    ]);
    for (k, v) in rows {
        output::line(&format!("{k:9} {v}"));
    }
    Ok(ExitCode::SUCCESS)
}

/// `bento agent status --json`'s `freshness`: `stale`, `fresh` or `unchecked`.
fn freshness_word(state: &crate::agent::state::State) -> &'static str {
    match (&state.stale, &state.fresh) {
        (Some(_), _) => "stale",
        (None, Some(_)) => "fresh",
        (None, None) => "unchecked",
    }
}

/// When systemd will start the agent next, if systemd runs its timer.
fn next_timer_run() -> Option<String> {
    let out = crate::sys::process::Cmd::new("systemctl")
        .args([
            "show",
            "bento-agent.timer",
            "--property=NextElapseUSecRealtime",
            "--value",
        ])
        .timeout(std::time::Duration::from_secs(10))
        .run()
        .ok()?;
    let text = out.stdout_text().trim().to_owned();
    (!text.is_empty() && text != "n/a").then_some(text)
}
