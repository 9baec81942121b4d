//! `bento completions SHELL` and `bento man`: shell completions and the man page, generated
//! from the same clap definitions the parser uses, so they cannot drift from the commands.

use std::process::ExitCode;

use clap::CommandFactory as _;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The shell to complete for
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "bento", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write bento.1 and one page per subcommand (bento-publish.1, …) into this directory
    /// instead of printing bento.1
    #[arg(long, value_name = "DIR")]
    out_dir: Option<std::path::PathBuf>,
}

pub fn man(args: ManArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let cmd = super::Cli::command();
    match args.out_dir {
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
            clap_mangen::generate_to(cmd, &dir).with_context(|| dir.display().to_string())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
