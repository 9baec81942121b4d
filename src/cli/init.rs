//! `bento init [DIR]`: a new fleet repo, committed to git, and the steps from there to a
//! managed machine.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::server::init::Git;
use crate::sys::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to create the fleet repo (created if missing)
    #[arg(default_value = ".")]
    dir: PathBuf,
}

/// What comes after `bento init`, in order; `{dir}` is the fleet repo.
pub const NEXT_STEPS: &str = "\
next steps (docs/server.md has each one in full):
  1. bento keygen                      # the signing key, outside the fleet repo; set [server] signing_key
  2. set [server] address in {dir}/bento.toml (the name the machines reach this server by)
  3. bento server sync-accounts        # as root: the chroot, the group and the accounts of bento.toml's hosts
  4. bento server sshd-config > /etc/ssh/sshd_config.d/00-bento.conf && sshd -t && systemctl reload ssh
  5. on each machine:  bento agent init --server <this server>    # prints a `bento host add` line
     here:             bento host add NAME --key '…'               # run as root: also makes its account
  6. git commit, then bento publish
  7. bento agent-config NAME           # the machine's /etc/bento/agent.toml; there: bento agent check";

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let created = crate::server::init::init(&args.dir)
        .with_context(|| format!("cannot create a fleet in {}", args.dir.display()))?;
    output::line(&format!(
        "created a fleet in {} ({} files)",
        args.dir.display(),
        created.len()
    ));
    match crate::server::init::git_init(&args.dir) {
        Git::Committed => output::line("made it a git repository with a first commit"),
        Git::InsideRepo(top) => output::note(&format!(
            "{} is inside the git repository {}: commit the new files there",
            args.dir.display(),
            top.display()
        )),
        Git::Failed(e) => output::warning(&format!(
            "could not make {} a git repository ({e}); publish records the fleet's commit, so run `git init` and commit it yourself",
            args.dir.display()
        )),
    }
    output::line(&NEXT_STEPS.replace("{dir}", &args.dir.display().to_string()));
    Ok(ExitCode::SUCCESS)
}
