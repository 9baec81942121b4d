//! `bento status` (being written).

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_fleet: Option<PathBuf>, _args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`bento status` is not implemented yet")
}
