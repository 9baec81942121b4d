//! The machine-side agent: one `bento agent update` run polls the host's chroot, fetches
//! only what changed, builds, activates, confirms the server is still reachable (rolling
//! back if not) and reports. See docs/agent.md.
//!
//! The layout follows the run: `source` (what is read from and written to the server) and
//! `fetch` (bounded, verified, resumable reads over any source); `decide` (what to do, from
//! facts alone); `apply` and `self_update` (the typed steps, changing the machine only
//! through `host`; `substitute` fetches a prebuilt system's missing NARs); `record` (report, state, spool, heartbeat). `config` is agent.toml,
//! `state` the state directory, `files` the staged tree and installed files.
//!
//! Layer rule: nothing here imports the server or the CLI; shared types come from
//! `crate::protocol`.

mod apply;
mod checks;
// Issue #27: which of `server` and the `mirrors` a run follows.
mod choose;
pub mod config;
mod decide;
mod fetch;
pub mod files;
pub mod fresh;
pub mod host;
// Issue #25: `bento agent init` (the machine's key) and `bento agent check`.
pub mod identity;
mod live_host;
mod nar;
mod outcome;
mod packed;
pub mod page;
pub mod preflight;
mod record;
mod run;
mod self_update;
pub mod source;
mod substitute;
// Decrypting encrypted `files` entries with identity_file (see docs/security.md).
pub mod secrets;
pub mod state;
#[cfg(test)]
mod unit_tier;
pub mod units;

pub use config::{AgentConfig, Mode};
pub use outcome::{AgentError, Connect, RunResult, UpdateOptions};
pub use run::update;
