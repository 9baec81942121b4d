//! Exit statuses: the one place each command's codes are defined, and where the EXIT STATUS
//! sections of `--help` and the man pages come from, so the two cannot drift apart.

use crate::agent::RunResult;

/// Everything went as asked.
pub const SUCCESS: u8 = 0;
/// An error stopped the command, or (for commands over several hosts) a host failed.
pub const ERROR: u8 = 1;
/// `bento status`: a host is failing, rolled back, silent or stale.
pub const UNHEALTHY: u8 = 2;
/// `bento status`: no host is unhealthy, but one is `drifted` (runs another system than the
/// one it applied).
pub const DRIFTED: u8 = 3;

/// The codes of the command at `path` (`["agent", "update"]`), with what each means.
pub fn codes(path: &[&str]) -> Vec<(u8, &'static str)> {
    match path {
        ["agent", "update"] => vec![
            (RunResult::EXIT_NOOP, "nothing to do: up to date, nothing published, backing off, or the live version was rolled back before"),
            (RunResult::EXIT_UPDATED, "a new version was applied (systemd counts it a success: SuccessExitStatus=10); the output says `unchanged (same system)` when it runs the system already running"),
            (RunResult::EXIT_FAILED, "failed: fetching, building or activating failed and the running system was kept (or a health check failed with on_failure = \"keep\")"),
            (RunResult::EXIT_ROLLED_BACK, "rolled back: activated, then lost the server or failed a health check, and went back to the previous system"),
            (RunResult::EXIT_STALE, "stale: the source offers no freshness stamp that vouches for its live version ([server] freshness), so it may withhold newer versions; nothing was changed"),
            (ERROR, "the run could not start or reach the server (bad agent.toml, not root, unreachable)"),
        ],
        ["agent", "check"] => vec![
            (SUCCESS, "every check passed (warnings aside)"),
            (ERROR, "a check failed: the line marked FAIL says what to fix"),
        ],
        ["status"] => vec![
            (SUCCESS, "every host is healthy (up to date, pending, new or held)"),
            (ERROR, "bento.toml or a host's files could not be read (the state of some host is unknown)"),
            (UNHEALTHY, "a host is failing, rolled back, silent or stale"),
            (DRIFTED, "no host is unhealthy, but a host is drifted (runs another system than the one it applied)"),
        ],
        ["server", "check"] => vec![
            (SUCCESS, "the server and every host account are set up as bento.toml says"),
            (ERROR, "a problem was found (listed per host) or the check could not run"),
        ],
        ["publish"] => vec![
            (SUCCESS, "every selected host succeeded (with --dry-run: every selected host could be published, whether or not it would get a new version)"),
            (ERROR, "a host failed (the others were still done; with --dry-run: would fail) or the command could not run"),
        ],
        ["rollout"] | ["rollback"] | ["trigger"] | ["build"] | ["flake-update"] => vec![
            (SUCCESS, "every selected host succeeded"),
            (ERROR, "a host failed (the others were still done) or the command could not run"),
        ],
        ["diff"] => vec![
            (SUCCESS, "every host's difference was shown"),
            (ERROR, "a host could not be compared (not built, does not evaluate, not in the store) or the command could not run"),
        ],
        _ => vec![
            (SUCCESS, "success"),
            (ERROR, "an error, named on stderr"),
        ],
    }
}

/// The EXIT STATUS text for `path`, as `--help` shows it.
pub fn section(path: &[&str]) -> String {
    let mut text = String::from("EXIT STATUS:\n");
    for (code, meaning) in codes(path) {
        text.push_str(&format!("  {code:<3} {meaning}\n"));
    }
    text.trim_end().to_owned()
}

/// `cmd` and every subcommand with its EXIT STATUS section after the help text.
pub fn annotate(cmd: clap::Command) -> clap::Command {
    fn walk(cmd: clap::Command, path: &mut Vec<String>) -> clap::Command {
        let names: Vec<String> = cmd
            .get_subcommands()
            .map(|s| s.get_name().to_owned())
            .collect();
        let mut cmd = cmd;
        for name in names {
            path.push(name.clone());
            cmd = cmd.mut_subcommand(&name, |sub| walk(sub, path));
            path.pop();
        }
        let refs: Vec<&str> = path.iter().map(String::as_str).collect();
        let exit = section(&refs);
        let after = match cmd.get_after_help() {
            Some(text) => format!("{text}\n\n{exit}"),
            None => exit,
        };
        cmd.after_help(after)
    }
    walk(cmd, &mut Vec::new())
}

/// Man pages for `cmd` and every visible subcommand (`bento.1`, `bento-publish.1`, …), each
/// with an EXIT STATUS section; one page to `w` when `dir` is `None`.
pub fn man_pages(
    cmd: clap::Command,
    dir: Option<&std::path::Path>,
    w: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    fn page(cmd: &clap::Command, path: &[&str], w: &mut dyn std::io::Write) -> std::io::Result<()> {
        let man = clap_mangen::Man::new(cmd.clone());
        man.render_title(w)?;
        man.render_name_section(w)?;
        man.render_synopsis_section(w)?;
        man.render_description_section(w)?;
        if cmd.get_arguments().any(|a| !a.is_hide_set()) {
            man.render_options_section(w)?;
        }
        if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
            man.render_subcommands_section(w)?;
        }
        writeln!(w, ".SH \"EXIT STATUS\"")?;
        for (code, meaning) in codes(path) {
            writeln!(w, ".TP\n\\fB{code}\\fR\n{}", roff_text(meaning))?;
        }
        if cmd.get_after_help().is_some() {
            man.render_extra_section(w)?;
        }
        if cmd.get_version().is_some() {
            man.render_version_section(w)?;
        }
        Ok(())
    }
    fn walk(
        cmd: &clap::Command,
        path: &mut Vec<String>,
        dir: Option<&std::path::Path>,
        w: &mut dyn std::io::Write,
    ) -> std::io::Result<()> {
        let refs: Vec<&str> = path.iter().map(String::as_str).collect();
        match dir {
            None => return page(cmd, &refs, w),
            Some(dir) => {
                let name = std::iter::once("bento")
                    .chain(refs.iter().copied())
                    .collect::<Vec<_>>()
                    .join("-");
                let mut file = std::fs::File::create(dir.join(format!("{name}.1")))?;
                page(cmd, &refs, &mut file)?;
            }
        }
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            path.push(sub.get_name().to_owned());
            walk(sub, path, dir, w)?;
            path.pop();
        }
        Ok(())
    }
    walk(&cmd, &mut Vec::new(), dir, w)
}

/// Text safe in a roff line: backslashes escaped, and no leading dot or quote.
fn roff_text(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    if text.starts_with(['.', '\'']) {
        format!("\\&{text}")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_the_agent_returns_is_in_its_section() {
        let listed: Vec<u8> = codes(&["agent", "update"]).iter().map(|c| c.0).collect();
        for code in [
            RunResult::EXIT_NOOP,
            RunResult::EXIT_UPDATED,
            RunResult::EXIT_FAILED,
            RunResult::EXIT_ROLLED_BACK,
            ERROR,
        ] {
            assert!(listed.contains(&code), "{code}");
        }
        assert_eq!(
            crate::agent::units::SUCCESS_EXIT_STATUS,
            RunResult::EXIT_UPDATED.to_string()
        );
    }

    #[test]
    fn status_json_help_names_every_state_and_the_array() {
        use clap::CommandFactory as _;
        let cmd = crate::cli::Cli::command();
        let status = cmd.find_subcommand("status").unwrap();
        let json = status
            .get_arguments()
            .find(|a| a.get_id() == "json")
            .unwrap();
        let help = json.get_help().unwrap().to_string();
        assert!(help.contains("JSON array"), "{help}");
        for state in crate::server::status::State::ALL {
            assert!(help.contains(state.key()), "{}: {help}", state.key());
        }
    }
}
