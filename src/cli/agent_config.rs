//! `bento agent-config NAME`: prints a host's agent settings, built from bento.toml, as
//! agent.toml (with the known_hosts line it needs), a NixOS block, or JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::server::enrol::{agent_settings, MachinePaths};
use crate::server::fleet::{HostName, FLEET_FILE};
use crate::sys::output;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "On the machine: save the output as /etc/bento/agent.toml and put the \
known_hosts line it names into the known_hosts file; `bento agent check` then says whether \
everything fits. --json carries both (agent_toml, known_hosts_line) and where each goes."
)]
pub struct Args {
    /// The host (a [hosts.NAME] of bento.toml)
    #[arg(value_name = "NAME")]
    name: String,
    /// Print a `services.bento.agent = { … };` block for the host's NixOS configuration
    #[arg(long, conflicts_with = "json")]
    nixos: bool,
    /// Print JSON: the settings, `agent_toml` and `nixos` texts
    #[arg(long)]
    json: bool,
    /// Where the machine keeps its SSH key
    #[arg(long, value_name = "FILE", default_value = "/etc/bento/id_ed25519")]
    identity_file: PathBuf,
    /// Where the machine keeps the server's host key
    #[arg(long, value_name = "FILE", default_value = "/etc/bento/known_hosts")]
    known_hosts: PathBuf,
}

pub fn run(fleet: Option<PathBuf>, args: Args) -> anyhow::Result<ExitCode> {
    let fleet = super::load_fleet(fleet)?;
    let toml = fleet.root.join(FLEET_FILE);
    let host = HostName::new(&args.name).with_context(|| format!("host {:?}", args.name))?;
    let paths = MachinePaths {
        identity_file: args.identity_file,
        known_hosts: args.known_hosts,
    };
    let settings = agent_settings(&fleet.config, &host, &paths)
        .with_context(|| format!("{}: agent settings of host {host}", toml.display()))?;
    if settings.trusted_keys.is_empty() {
        output::warning(&format!(
            "{} has no [server] signing_key: the agent will apply unsigned manifests (`bento keygen` makes one)",
            toml.display()
        ));
    }
    if args.json {
        let mut value = serde_json::to_value(&settings)?;
        value["agent_toml"] = settings.agent_toml().into();
        value["nixos"] = settings.nixos().into();
        output::json(&value)?;
    } else if args.nixos {
        output::line(settings.nixos().trim_end());
    } else {
        output::line(settings.agent_toml().trim_end());
    }
    Ok(ExitCode::SUCCESS)
}
