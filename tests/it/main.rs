//! bento's integration tests: one binary, shared fixtures in `common`.

mod agent;
mod build;
mod checks;
mod cli;
mod common;
mod delivery;
mod docs;
mod fails_alone;
mod faults;
mod holds;
mod hostile;
mod init;
mod layers;
mod log;
mod machines;
mod nixos;
mod page;
mod plaintext;
mod publish;
mod restore;
mod rollout;
mod secrets;
mod server;
mod signing;
mod status;
mod substitute;
