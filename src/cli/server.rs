//! `bento server …`: the NixOS module, the sshd block for other servers, account sync and
//! the live check. Turns the server module's results into output and exit codes.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use crate::server::provision::{self, CheckOptions, SyncAction};
use crate::sys::{output, terminal};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the NixOS module the server imports (accounts, keys, sshd Match block, chroots)
    NixosModule {
        /// Where to write it; `-` for stdout
        #[arg(long, short, value_name = "FILE", default_value = "fleet.nix")]
        output: PathBuf,
    },
    /// Print the sshd settings for a non-NixOS server, to install as the first drop-in
    #[command(
        after_help = "Install it as the first drop-in, so no other Match block comes before it \
(sshd takes the first value of each keyword; docs/server.md):\n  \
bento server sshd-config > /etc/ssh/sshd_config.d/00-bento.conf && sshd -t && systemctl reload ssh\n\
Appending it to /etc/ssh/sshd_config (>>) is wrong on a stock Debian: an earlier Match block, or \
anything appended later, changes what applies to the hosts' accounts."
    )]
    SshdConfig,
    /// Create and update the host accounts and their key files on a non-NixOS server (root)
    SyncAccounts {
        /// Also remove accounts with the fleet's prefix, in its group ([server] group), that are no longer in bento.toml
        #[arg(long)]
        prune: bool,
        /// Print a JSON summary on stdout
        #[arg(long)]
        json: bool,
        /// The chroot root (default: [server] chroot in bento.toml, else /srv/bento)
        #[arg(long, value_name = "DIR")]
        chroot: Option<PathBuf>,
    },
    /// Check the live server host by host; exits non-zero if anything is wrong
    Check {
        /// The sshd configuration to check
        #[arg(long, value_name = "FILE", default_value = "/etc/ssh/sshd_config")]
        sshd_config: PathBuf,
        /// The sshd binary (default: sshd on PATH, else /usr/sbin/sshd)
        #[arg(long, value_name = "FILE")]
        sshd: Option<PathBuf>,
        /// Print a JSON report on stdout
        #[arg(long)]
        json: bool,
        /// The chroot root (default: [server] chroot in bento.toml, else /srv/bento)
        #[arg(long, value_name = "DIR")]
        chroot: Option<PathBuf>,
        /// Flag hosts whose logs/ (and backups/) use more disk than this (e.g. 512M, 2G)
        #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
        logs_limit: u64,
    },
    /// Print the least-privilege policy of [server] store for ENGINE (one identity per host),
    /// keep each host's fresh keys root-only in [server] state, and seal each host's
    /// credentials file to its SSH key
    S3Policy {
        /// The engine's form: SeaweedFS -s3.config JSON, garage commands or IAM policy JSON
        #[arg(long, value_enum)]
        engine: Engine,
    },
}

/// The engines `bento server s3-policy` speaks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    Seaweedfs,
    Garage,
    Aws,
}

/// `512M`, `2G`, `64K` or a number of bytes; the units are binary (`M` is MiB).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.as_bytes().last() {
        Some(b'K' | b'k') => (&t[..t.len() - 1], 10),
        Some(b'M' | b'm') => (&t[..t.len() - 1], 20),
        Some(b'G' | b'g') => (&t[..t.len() - 1], 30),
        Some(b'T' | b't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 512M, 2G, 65536)"))
}

/// bento.toml's settings with `--chroot` over `[server] chroot`.
fn with_chroot(
    config: &crate::server::fleet::FleetConfig,
    chroot: Option<PathBuf>,
) -> anyhow::Result<crate::server::fleet::FleetConfig> {
    let mut config = config.clone();
    if let Some(dir) = chroot {
        config.server.chroot =
            std::path::absolute(&dir).with_context(|| format!("chroot {}", dir.display()))?;
    }
    Ok(config)
}

pub fn run(fleet: Option<PathBuf>, cmd: Command) -> anyhow::Result<ExitCode> {
    let fleet = super::load_fleet(fleet)?;
    let config = &fleet.config;
    match cmd {
        Command::NixosModule { output } => {
            let toml = fleet.root.join(crate::server::fleet::FLEET_FILE);
            let keys = provision::fleet_keys(config).with_context(|| toml.display().to_string())?;
            let text = provision::nixos::render(config, &keys)
                .with_context(|| toml.display().to_string())?;
            if output.as_os_str() == "-" {
                std::io::stdout()
                    .write_all(text.as_bytes())
                    .context("writing to stdout")?;
            } else {
                crate::sys::atomic::write_file(&output, text.as_bytes(), 0o644)
                    .with_context(|| format!("writing {}", output.display()))?;
                tracing::info!(
                    "wrote {} ({} host{})",
                    output.display(),
                    config.hosts.len(),
                    if config.hosts.len() == 1 { "" } else { "s" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::SshdConfig => {
            provision::sshd::check_server_paths(&config.server).with_context(|| {
                fleet
                    .root
                    .join(crate::server::fleet::FLEET_FILE)
                    .display()
                    .to_string()
            })?;
            std::io::stdout()
                .write_all(provision::sshd_config(&config.server).as_bytes())
                .context("writing to stdout")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SyncAccounts {
            prune,
            json,
            chroot,
        } => {
            let config = with_chroot(config, chroot)?;
            let reports = provision::sync_accounts(&config, prune)
                .with_context(|| format!("syncing the accounts of {}", fleet.root.display()))?;
            if json {
                output::json(&reports)?;
            } else {
                let width = reports.iter().map(|r| r.account.len()).max().unwrap_or(0);
                for r in &reports {
                    let action = match r.action {
                        SyncAction::Created => "created",
                        SyncAction::Updated => "updated",
                        SyncAction::Unchanged => "unchanged",
                        SyncAction::Removed => "removed",
                        SyncAction::Failed => "failed",
                    };
                    let host = r.host.as_ref().map(|h| h.as_str()).unwrap_or("-");
                    output::line(
                        format!(
                            "{:width$}  {action:9}  {host}  {}",
                            r.account,
                            r.details.join("; ")
                        )
                        .trim_end(),
                    );
                }
            }
            let failed = reports
                .iter()
                .filter(|r| r.action == SyncAction::Failed)
                .count();
            if failed > 0 {
                tracing::error!("{failed} account(s) failed");
                return Ok(ExitCode::from(super::EXIT_ERROR));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::S3Policy { engine } => s3_policy(&fleet, engine),
        Command::Check { json, .. } if config.server.store.is_some() => check_store(&fleet, json),
        Command::Check {
            sshd_config,
            sshd,
            json,
            chroot,
            logs_limit,
        } => {
            let config = with_chroot(config, chroot)?;
            let sshd = sshd.unwrap_or_else(find_sshd);
            let report = provision::check(
                &config,
                &CheckOptions {
                    sshd,
                    sshd_config,
                    logs_limit,
                },
            );
            if json {
                output::json(&report)?;
            } else {
                let width = report
                    .hosts
                    .iter()
                    .map(|h| h.host.as_str().len())
                    .chain([6])
                    .max()
                    .unwrap_or(6);
                let show = |name: &str, problems: &[String]| {
                    if problems.is_empty() {
                        output::line(&format!("{name:width$}  ok"));
                    } else {
                        output::line(&format!(
                            "{name:width$}  {} problem{}",
                            problems.len(),
                            if problems.len() == 1 { "" } else { "s" }
                        ));
                        for p in problems {
                            output::line(&format!("{:width$}  - {}", "", terminal::escape(p)));
                        }
                    }
                };
                show("server", &report.server);
                for h in &report.hosts {
                    show(h.host.as_str(), &h.problems);
                }
                for w in &report.warnings {
                    output::note(&format!("warning: {}", terminal::escape(w)));
                }
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(super::EXIT_ERROR)
            })
        }
    }
}

/// `bento server s3-policy`: the policy on stdout, keys and sealed credentials files in the
/// publisher's state.
fn s3_policy(fleet: &crate::server::fleet::Fleet, engine: Engine) -> anyhow::Result<ExitCode> {
    use crate::server::s3policy;
    let toml = fleet.root.join(crate::server::fleet::FLEET_FILE);
    let server = &fleet.config.server;
    let url = server.store.as_deref().with_context(|| {
        format!(
            "{}: no [server] store = \"s3://…\" to make a policy for",
            toml.display()
        )
    })?;
    let files: crate::sys::s3::Location = url
        .parse()
        .with_context(|| format!("{}: [server] store", toml.display()))?;
    let reports: Option<crate::sys::s3::Location> = server
        .reports
        .as_deref()
        .map(str::parse)
        .transpose()
        .with_context(|| format!("{}: [server] reports", toml.display()))?;
    let hosts: Vec<_> = fleet.config.hosts.keys().cloned().collect();
    let state = super::select::chroot_of(fleet, None)?;
    let rights = s3policy::rights(&files, reports.as_ref(), &hosts)?;
    let keys = s3policy::host_keys(&state, &hosts)?;
    let publisher = crate::sys::s3::Credentials::resolve(server.s3_credentials.as_deref()).ok();
    let text = match engine {
        Engine::Seaweedfs => s3policy::seaweedfs(&rights, &keys, publisher.as_ref()),
        Engine::Garage => s3policy::garage(&rights, &keys, publisher.as_ref()),
        Engine::Aws => s3policy::aws(&rights),
    };
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing to stdout")?;
    let dir = s3policy::keys_dir(&state);
    for (host, creds) in &keys {
        let Some(ssh) = fleet.config.hosts.get(host).and_then(|h| h.key.as_deref()) else {
            output::note(&format!(
                "{host}: no [hosts.{host}] key to seal its credentials to; its file is {}",
                dir.join(host.as_str()).display()
            ));
            continue;
        };
        let sealed = s3policy::sealed_credentials(host, ssh, creds)?;
        let path = dir.join(format!("{host}.age"));
        crate::sys::atomic::write_file(&path, &sealed, 0o600)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    output::note(&format!(
        "each host's credentials file, sealed to its SSH key: {}/<host>.age (install it as the agent's credentials_file)",
        dir.display()
    ));
    Ok(ExitCode::SUCCESS)
}

/// `bento server check` of an object store: can the publisher reach it, and which guard
/// keeps two publishes from switching one `current` (compare-and-swap or the lock).
fn check_store(fleet: &crate::server::fleet::Fleet, json: bool) -> anyhow::Result<ExitCode> {
    use crate::server::store::Cas;
    let state = super::select::chroot_of(fleet, None)?;
    let store = super::select::s3_store_of(fleet, &state)?;
    let cas = store.probe().context("probing the object store")?;
    let guard = match cas {
        Cas::Honoured => "compare-and-swap (the engine honours conditional writes)",
        Cas::Ignored => "the publisher's lock only: the engine ignores conditional writes (run one publisher at a time)",
        Cas::Unknown => "unknown (no host to probe at)",
    };
    if json {
        output::json(&serde_json::json!({
            "store": fleet.config.server.store,
            "conditional_writes": cas,
            "guard": if cas == Cas::Honoured { "cas" } else { "lock" },
        }))?;
    } else {
        output::line(&format!(
            "store  ok  {}",
            terminal::escape(fleet.config.server.store.as_deref().unwrap_or(""))
        ));
        output::line(&format!("guard  {guard}"));
    }
    if cas == Cas::Ignored {
        output::note("warning: conditional writes are ignored by this engine; only the publisher's lock guards `current`");
    }
    Ok(ExitCode::SUCCESS)
}

/// sshd from PATH (NixOS keeps it in /run/current-system/sw/bin), else Debian's.
fn find_sshd() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("sshd"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/sshd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary_and_garbage_is_refused() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in ["", "M", "1.5G", "-1", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
