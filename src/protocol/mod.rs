//! The protocol core: everything the server writes and the agent reads (and the reverse), so
//! both sides agree on names, bytes and times. It imports neither side (nor Nix nor the CLI):
//! server and agent depend on it, never the reverse. Nothing here runs a process or knows which
//! side it is on.

/// Health checks after activation (`checks`, `on_failure`) and their results in reports.
pub mod check;
/// The signed freshness stamp (`[server] freshness`): how long a copy may withhold versions.
pub mod freshness;
pub mod layout;
/// Digests, relative paths and configuration entries: what manifests and trees list.
pub mod listing;
pub mod manifest;
pub mod name;
/// Binary-cache metadata for `build_on = "server"` hosts (issue #12).
pub mod narinfo;
/// Manifest format 2's packs of small objects, read by range (issue #26).
pub mod pack;
pub mod report;
// Encrypted `files` entries (age): shared by publish, the agent and `bento secret`.
pub mod secret;
pub mod settings;
pub mod signing;
pub mod store_path;
pub mod time;
/// Manifest format 2's content-addressed directory trees (issue #26).
pub mod tree;

pub use name::{account_name, check_group, check_prefix, HostName, NameError, MAX_ACCOUNT_LEN};
pub use settings::Mode;
pub use store_path::StorePath;
pub use time::Timestamp;
