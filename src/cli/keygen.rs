//! `bento keygen`: the fleet's signing key.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::sys::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the private key (the public key goes to FILE.pub)
    #[arg(
        long,
        short,
        default_value = "/etc/bento/signing_key",
        value_name = "FILE"
    )]
    output: PathBuf,
    /// Comment stored in the key
    #[arg(long, default_value = "bento fleet signing key")]
    comment: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let public = crate::protocol::signing::generate(&args.output, &args.comment)?;
    let line = public.to_openssh()?;
    output::line(&line);
    output::note(&format!(
        "wrote {} (keep it out of the fleet repo) and {}.\n  bento.toml:  [server] signing_key = \"{}\"\n  agent.toml:  trusted_keys = [\"{}\"]",
        args.output.display(),
        args.output.display(),
        args.output.display(),
        line
    ));
    Ok(ExitCode::SUCCESS)
}
