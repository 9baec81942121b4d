//! `bento server …` (being written for the server issue).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum Command {}

pub fn run(_fleet: Option<PathBuf>, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {}
}
