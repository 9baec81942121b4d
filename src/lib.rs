//! bento: a pull-based fleet manager for NixOS.
//!
//! The server side turns a fleet repo into per-host, content-addressed snapshots in SFTP
//! chroots (`publish`); each machine's agent pulls its own snapshot, builds and activates
//! it. The binary (`src/main.rs`, `cli`) is a thin layer over these modules.

pub mod accounts;
pub mod agent;
pub mod atomic;
pub mod build;
pub mod cli;
pub mod fleet;
pub mod hostfiles;
pub mod init;
pub mod layout;
pub mod manifest;
pub mod nix;
pub mod output;
pub mod publish;
pub mod report;
pub mod server;
pub mod settings;
pub mod signing;
pub mod snapshot;
pub mod status;
pub mod transport;
