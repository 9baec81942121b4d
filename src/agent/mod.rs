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

// server::provision::keys's tests still name the page's base64 at its old path; that
// cross-side import is being removed on another branch, so it keeps working until then.
#[cfg(test)]
pub(crate) mod serve {
    pub(crate) use super::page::base64;
}
