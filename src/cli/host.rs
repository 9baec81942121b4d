//! `bento host add`: enrols a machine in the fleet (bento.toml, its directory and, as root
//! against a local chroot, its account), then says what comes next.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use crate::server::enrol::{add_host, AddRequest};
use crate::server::fleet::FLEET_FILE;
use crate::server::provision::{self, SyncAction};
use crate::sys::output;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add a host to bento.toml (every other line kept as it was) and create hosts/NAME/;
    /// as root, with the chroot on this machine, also its account
    #[command(after_help = "EXAMPLE:\n  bento host add alpha --key-file alpha.pub --tag web")]
    Add(AddArgs),
}

#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// The host's name (its account is <account_prefix><NAME>)
    #[arg(value_name = "NAME")]
    name: String,
    /// The host's SSH public key line (what `bento agent init` printed)
    #[arg(
        long,
        value_name = "PUBKEY",
        required_unless_present = "key_file",
        conflicts_with = "key_file"
    )]
    key: Option<String>,
    /// A file holding the host's public key (its /etc/bento/id_ed25519.pub)
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// A tag for `--on @TAG` and rollout waves (repeatable)
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// A flake directory of the fleet (hosts/DIR) that defines the host in its
    /// nixosConfigurations, instead of a new hosts/NAME/configuration.nix
    #[arg(long, value_name = "DIR")]
    flake: Option<PathBuf>,
    /// Do not create the host's account even when running as root
    #[arg(long)]
    no_account: bool,
}

pub fn run(fleet: Option<PathBuf>, cmd: Command) -> anyhow::Result<ExitCode> {
    let Command::Add(args) = cmd;
    let fleet = super::load_fleet(fleet)?;
    let key = match (&args.key, &args.key_file) {
        (Some(k), _) => k.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("reading the host's key from {}", file.display()))?,
        (None, None) => anyhow::bail!("give the host's key: --key PUBKEY or --key-file FILE"),
    };
    // The account would be refused in a group that holds another fleet's accounts: say so
    // before bento.toml changes, as sync-accounts does before the system changes.
    let make_account =
        !args.no_account && crate::sys::accounts::is_root() && fleet.config.server.chroot.is_dir();
    if make_account {
        provision::group::refuse_strangers(&fleet.config).with_context(|| {
            format!(
                "{}: not adding host {}",
                fleet.root.join(FLEET_FILE).display(),
                args.name
            )
        })?;
    }
    let added = add_host(
        &fleet,
        &AddRequest {
            name: &args.name,
            key: key.trim(),
            tags: &args.tags,
            flake: args.flake.as_deref(),
        },
    )?;
    let host = &added.host;
    let toml = fleet.root.join(FLEET_FILE);
    output::line(&format!("added [hosts.{host}] to {}", toml.display()));
    for path in &added.created {
        output::line(&format!("created {}", path.display()));
    }
    if let Some(dir) = &added.flake {
        output::note(&format!(
            "{dir} must define nixosConfigurations.{host}",
            dir = dir.display()
        ));
    }
    // As sync-accounts would, for this host only: the rest of the fleet is not touched.
    let chroot = &added.config.server.chroot;
    let mut account = false;
    if make_account && chroot.is_dir() {
        let mut one = added.config.clone();
        one.hosts.retain(|h, _| h == host);
        let reports = provision::sync_accounts(&one, false)
            .with_context(|| format!("creating the account of host {host}"))?;
        for r in &reports {
            if r.action == SyncAction::Failed {
                anyhow::bail!(
                    "host {host} is in {} but its account {} failed: {}",
                    toml.display(),
                    r.account,
                    r.details.join("; ")
                );
            }
            output::line(&format!("account {}: {:?}", r.account, r.action).to_lowercase());
        }
        account = true;
    }
    let sync = if account {
        String::new()
    } else {
        "`bento server sync-accounts` (as root, on the server), ".to_owned()
    };
    output::note(&format!(
        "next: {sync}`bento publish`, then `bento agent-config {host}` prints the settings to put in the host's /etc/bento/agent.toml"
    ));
    Ok(ExitCode::SUCCESS)
}
