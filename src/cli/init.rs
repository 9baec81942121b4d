//! `bento init [DIR]`

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to create the fleet repo (created if missing)
    #[arg(default_value = ".")]
    dir: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let created = crate::server::init::init(&args.dir)
        .with_context(|| format!("cannot create a fleet in {}", args.dir.display()))?;
    crate::sys::output::line(&format!(
        "created a fleet in {} ({} files); next: edit bento.toml, then `bento publish`",
        args.dir.display(),
        created.len()
    ));
    Ok(ExitCode::SUCCESS)
}
