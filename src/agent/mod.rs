//! The machine-side agent: one `bento agent update` run polls the host's chroot, fetches
//! only what changed, builds, activates, confirms the server is still reachable (rolling
//! back if not) and reports. See docs/agent.md.

pub mod config;
pub mod files;
mod run;
// Decrypting encrypted `files` entries with identity_file (see docs/security.md).
pub mod secrets;
pub mod serve;
pub mod state;
pub mod system;
pub mod transport;
pub mod units;

pub use config::{AgentConfig, Mode};
pub use run::{update, AgentError, RunResult, UpdateOptions};
