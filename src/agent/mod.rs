//! The machine-side agent: one `bento agent update` run polls the host's chroot, fetches
//! only what changed, builds, activates, confirms the server is still reachable (rolling
//! back if not) and reports. See docs/agent.md.

pub mod config;
pub mod files;
pub mod page;
mod run;
pub mod state;
pub mod system;
pub mod transport;
pub mod units;

pub use config::{AgentConfig, Mode};
pub use run::{update, AgentError, RunResult, UpdateOptions};
