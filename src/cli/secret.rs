//! `bento secret edit | show | rekey | encrypt`: the admin's tools for `.age` files in the fleet repo
//! (docs/security.md, "Secrets at rest").

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use crate::nix::Nix;
use crate::server::fleet::{Fleet, HostName, HostSource, NixFlakeHosts};
use crate::server::secrets::{self, EditOutcome, RekeyOutcome, SecretsError};
use crate::server::snapshot::{HashCache, Scanner};
use crate::sys::output;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Decrypt a host's secret into $EDITOR and encrypt the result to the host and
    /// [secrets] recipients (a new PATH starts empty)
    Edit {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        identity: Identity,
    },
    /// Print a host's secret, decrypted, on stdout
    Show {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        identity: Identity,
    },
    /// Turn a host's plaintext files/ entry into an .age file encrypted to the hosts that
    /// use it and [secrets] recipients (its files.toml key follows), removing the plaintext
    Encrypt {
        #[command(flatten)]
        target: Target,
    },
    /// Re-encrypt every .age file to its hosts' current keys and [secrets] recipients
    /// (after a host key or recipient change)
    Rekey {
        /// Only files this host uses (repeatable)
        #[arg(long = "host", value_name = "NAME", value_parser = super::select::parse_host)]
        hosts: Vec<HostName>,
        /// Only files used by hosts matching this name or glob (`web-*`; repeatable)
        #[arg(long = "on", value_name = "SEL")]
        on: Vec<String>,
        /// Re-encrypt even files already encrypted to exactly the current keys
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        identity: Identity,
    },
}

#[derive(Debug, clap::Args)]
pub struct Target {
    /// The host
    #[arg(value_parser = super::select::parse_host)]
    host: HostName,
    /// The file under the host's files/ directory (`etc/wg0.key`; `.age` optional)
    path: String,
}

#[derive(Debug, clap::Args)]
pub struct Identity {
    /// The admin's private key (default: [secrets] identity, else ~/.ssh/id_ed25519)
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,
}

fn discover(fleet: &Fleet) -> anyhow::Result<Vec<HostSource>> {
    let scanner = Scanner::new(fleet.root.clone(), HashCache::default(), SystemTime::now());
    let flakes = NixFlakeHosts::new(Nix::default(), None);
    Ok(crate::server::fleet::discover(fleet, &scanner, &flakes)?)
}

fn shown(fleet: &Fleet, file: &Path) -> String {
    file.strip_prefix(&fleet.root)
        .unwrap_or(file)
        .display()
        .to_string()
}

pub fn run(fleet: Option<PathBuf>, cmd: Command) -> anyhow::Result<ExitCode> {
    // Raised before anything starts a thread, so every thread inherits the blocked signals.
    let _shield = matches!(cmd, Command::Edit { .. } | Command::Show { .. })
        .then(super::editor::Shield::raise);
    let fleet = super::load_fleet(fleet)?;
    let sources = discover(&fleet)?;
    match cmd {
        Command::Show { target, identity } => {
            let id = secrets::identity_path(&fleet.config, identity.identity);
            let plain = secrets::show(&fleet, &sources, &target.host, &target.path, &id)?;
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            out.write_all(&plain)?;
            out.flush()?;
        }
        Command::Edit { target, identity } => {
            let id = secrets::identity_path(&fleet.config, identity.identity);
            let (file, outcome) = secrets::edit(
                &fleet,
                &sources,
                &target.host,
                &target.path,
                &id,
                &super::editor::run_editor,
            )?;
            let what = match outcome {
                EditOutcome::Created => "created",
                EditOutcome::Updated => "encrypted",
                EditOutcome::Unchanged => "unchanged",
            };
            output::line(&format!("{what} {}", shown(&fleet, &file)));
        }
        Command::Encrypt { target } => {
            let done = secrets::encrypt(&fleet, &sources, &target.host, &target.path)?;
            let hosts: Vec<&str> = done.hosts.iter().map(HostName::as_str).collect();
            output::line(&format!(
                "encrypted {} → {} (to {}{})",
                shown(&fleet, &done.plaintext),
                shown(&fleet, &done.file),
                hosts.join(", "),
                if fleet.config.secrets.recipients.is_empty() {
                    ""
                } else {
                    " and [secrets] recipients"
                }
            ));
            if let Some(toml) = &done.toml {
                output::note(&format!(
                    "renamed its key in {} to the .age name",
                    shown(&fleet, toml)
                ));
            }
            output::note(
                "the plaintext is gone from the work tree, not from version control history",
            );
        }
        Command::Rekey {
            hosts,
            on,
            force,
            identity,
        } => {
            let mut only = hosts.clone();
            for h in &hosts {
                if !sources.iter().any(|s| &s.name == h) {
                    return Err(SecretsError::UnknownHost(h.clone()).into());
                }
            }
            for sel in &on {
                let matched: Vec<HostName> = sources
                    .iter()
                    .filter(|s| secrets::glob_match(sel, s.name.as_str()))
                    .map(|s| s.name.clone())
                    .collect();
                if matched.is_empty() {
                    return Err(SecretsError::NoMatch(sel.clone()).into());
                }
                only.extend(matched);
            }
            let id = secrets::identity_path(&fleet.config, identity.identity);
            let report = secrets::rekey(&fleet, &sources, &only, &id, force)?;
            for (file, users, outcome) in &report.files {
                let what = match outcome {
                    RekeyOutcome::Rekeyed => "rekeyed",
                    RekeyOutcome::UpToDate => "up to date",
                };
                let users: Vec<&str> = users.iter().map(HostName::as_str).collect();
                output::line(&format!(
                    "{what} {} ({})",
                    shown(&fleet, file),
                    users.join(", ")
                ));
            }
            if report.plaintext > 0 {
                let note = match fleet.config.secrets.encrypt {
                    secrets::EncryptMode::OnPublish => "publish encrypts them to the current keys",
                    _ => "they are published in the clear ([secrets] encrypt is off)",
                };
                output::note(&format!(
                    "{} plaintext file(s) under files/: {note}",
                    report.plaintext
                ));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
