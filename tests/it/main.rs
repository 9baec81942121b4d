//! bento's integration tests: one binary, shared fixtures in `common`.

mod common;
mod init;
mod publish;
mod server;
