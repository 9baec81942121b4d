//! Enrolling a host: `add` puts `[hosts.NAME]` into bento.toml by appending to the document
//! (every byte already there stays as it was) and lays out the host's directory;
//! `agent_config` renders, from bento.toml alone, the settings an agent needs to reach this
//! server and trust what it serves.

pub mod add;
pub mod agent_config;

pub use add::{add_host, AddError, AddRequest, Added};
pub use agent_config::{agent_settings, AgentConfigError, AgentSettings, MachinePaths};
