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
    if let Some(fleet) = fleet_completion(args.shell) {
        crate::sys::output::line(fleet);
    }
    Ok(ExitCode::SUCCESS)
}

/// Host names (and `@tags` for `--on`) from the bento.toml in effect, asked of the hidden
/// `bento complete hosts` with the words typed so far (so `--fleet DIR` on the line counts).
/// bash and fish; zsh keeps clap's static completion.
fn fleet_completion(shell: clap_complete::Shell) -> Option<&'static str> {
    match shell {
        clap_complete::Shell::Bash => Some(
            r#"
# bento: host names and @tags of the fleet in effect for `bento log`, --host and --on.
_bento_fleet() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" sub="" w skip=""
    for w in "${COMP_WORDS[@]:1:COMP_CWORD-1}"; do
        if [[ -n "$skip" ]]; then skip=""; continue; fi
        case "$w" in --fleet) skip=1 ;; -*) ;; *) sub="$w"; break ;; esac
    done
    case "$prev" in
        --host) COMPREPLY=($(compgen -W "$(bento complete hosts -- "${COMP_WORDS[@]}" 2>/dev/null)" -- "$cur")); return 0 ;;
        --on) COMPREPLY=($(compgen -W "$(bento complete hosts --tags -- "${COMP_WORDS[@]}" 2>/dev/null)" -- "$cur")); return 0 ;;
    esac
    if [[ "$sub" == log && "$cur" != -* && "$prev" == log ]]; then
        COMPREPLY=($(compgen -W "$(bento complete hosts -- "${COMP_WORDS[@]}" 2>/dev/null)" -- "$cur"))
        return 0
    fi
    _bento "$@"
}
complete -F _bento_fleet -o nosort -o bashdefault -o default bento"#,
        ),
        clap_complete::Shell::Fish => Some(
            r#"
# bento: host names and @tags of the fleet in effect for `bento log`, --host and --on.
complete -c bento -n '__fish_seen_subcommand_from log' -f -a '(bento complete hosts -- (commandline -opc) 2>/dev/null)'
complete -c bento -l host -x -a '(bento complete hosts -- (commandline -opc) 2>/dev/null)'
complete -c bento -l on -x -a '(bento complete hosts --tags -- (commandline -opc) 2>/dev/null)'"#,
        ),
        _ => None,
    }
}

#[derive(Debug, clap::Args)]
pub struct CompleteArgs {
    /// What to list (only `hosts`)
    #[arg(value_parser = ["hosts"])]
    what: String,
    /// Also list `@tag` for every tag
    #[arg(long)]
    tags: bool,
    /// The words typed so far (a `--fleet DIR` among them names the fleet)
    #[arg(last = true)]
    words: Vec<String>,
}

/// `bento complete hosts [--tags] -- WORDS…`: one candidate a line; nothing (and success)
/// when no fleet is found, so a shell shows no error while completing.
pub fn complete(top: Option<std::path::PathBuf>, args: CompleteArgs) -> anyhow::Result<ExitCode> {
    let typed = args
        .words
        .iter()
        .zip(args.words.iter().skip(1))
        .filter(|(flag, _)| *flag == "--fleet")
        .map(|(_, dir)| std::path::PathBuf::from(dir))
        .next_back();
    let Ok(fleet) = super::load_fleet(typed.or(top)) else {
        return Ok(ExitCode::SUCCESS);
    };
    for host in fleet.config.hosts.keys() {
        crate::sys::output::line(host.as_str());
    }
    if args.tags {
        let tags: std::collections::BTreeSet<&str> = fleet
            .config
            .hosts
            .values()
            .flat_map(|h| h.tags.iter().map(|t| t.as_str()))
            .collect();
        for tag in tags {
            crate::sys::output::line(&format!("@{tag}"));
        }
    }
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
        None => super::exit::man_pages(cmd, None, &mut std::io::stdout())?,
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
            super::exit::man_pages(cmd, Some(&dir), &mut std::io::sink())
                .with_context(|| dir.display().to_string())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
