//! bento: a pull-based fleet manager for NixOS.
//!
//! Layers, bottom to top (docs/architecture.md):
//! - [`sys`]: plumbing both sides use: atomic writes, one process runner, account lookups.
//! - [`protocol`]: what the server and the agent agree on: names, digests, the manifest and
//!   its canonical bytes, the chroot layout, reports and heartbeats, per-host settings,
//!   signatures, timestamps.
//! - [`nix`]: the Nix command line, as typed calls.
//! - [`server`]: the fleet repo, snapshots, publish, build, status, and SFTP provisioning.
//! - [`agent`]: what runs on each machine.
//! - [`cli`]: the `bento` command, a thin layer over the two sides.
//!
//! The agent side never imports the server side, nor the reverse (a test in
//! `tests/it/layers.rs` walks the sources and fails on any such import or import circle).

// No `unsafe` in bento itself: system calls go through maintained safe wrappers (the `nix`
// crate as `unix`, rustix, listenfd). Tests and benchmarks keep a few libc calls of their own.
#![forbid(unsafe_code)]

pub mod agent;
pub mod cli;
pub mod nix;
pub mod protocol;
pub mod server;
pub mod sys;
