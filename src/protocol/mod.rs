//! The protocol core: everything the server writes and the agent reads (and the reverse), so
//! both sides agree on names, bytes and times. Nothing here runs a process or knows which
//! side it is on.

pub mod layout;
pub mod manifest;
pub mod name;
/// Binary-cache metadata for `build_on = "server"` hosts (issue #12).
pub mod narinfo;
pub mod report;
pub mod settings;
pub mod signing;

pub use name::{account_name, check_prefix, HostName, NameError, MAX_ACCOUNT_LEN};
