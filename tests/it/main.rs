//! bento's integration tests: one binary, shared fixtures in `common`.

mod agent;
mod build;
mod checks;
mod cli;
mod common;
mod daytwo;
mod delivery;
mod docs;
mod enrol;
mod faults;
mod hostile;
mod hostile_agent;
mod hostile_server;
mod init;
mod layers;
mod log;
mod machines;
mod nixos;
mod page;
mod publish;
mod rollout;
mod secrets;
mod server;
mod signing;
mod status;
mod substitute;
