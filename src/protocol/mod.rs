//! The protocol core: everything the server writes and the agent reads (and the reverse), so
//! both sides agree on names, bytes and times. Nothing here runs a process or knows which
//! side it is on.

pub mod layout;
pub mod manifest;
pub mod name;
pub mod report;
// Encrypted `files` entries (age): shared by publish, the agent and `bento secret`.
pub mod secret;
pub mod settings;
pub mod signing;

pub use name::{account_name, check_prefix, HostName, NameError, MAX_ACCOUNT_LEN};
