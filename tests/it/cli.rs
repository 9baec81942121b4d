//! CLI conventions a user relies on: completions and the man page generated from the real
//! definitions, and help text on every flag and argument.

use std::process::Command;

use clap::CommandFactory as _;

use crate::common::bento;

fn stdout(args: &[&str]) -> String {
    let out = bento()
        .args(args)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    String::from_utf8(out).unwrap()
}

#[test]
fn completions_cover_every_command_and_load_in_bash() {
    let names: Vec<String> = bento::cli::Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    assert!(names.iter().any(|n| n == "publish") && names.iter().any(|n| n == "log"));
    for shell in ["bash", "zsh", "fish"] {
        let text = stdout(&["completions", shell]);
        for name in &names {
            assert!(
                text.contains(name.as_str()),
                "{shell} completions lack {name}"
            );
        }
    }
    // bash really accepts the script and registers it for `bento`.
    let script = stdout(&["completions", "bash"]);
    let out = Command::new("bash")
        .args(["-c", "eval \"$BENTO_COMPLETION\" && complete -p bento"])
        .env("BENTO_COMPLETION", script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("bento"));
    let err = bento()
        .args(["completions", "tcsh"])
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    assert!(String::from_utf8_lossy(&err).contains("tcsh"));
}

#[test]
fn man_page_is_generated_for_bento_and_each_subcommand() {
    let page = stdout(&["man"]);
    assert!(page.contains(".TH bento 1"), "{page}");
    assert!(page.contains("publish"), "{page}");
    let dir = tempfile::tempdir().unwrap();
    bento()
        .args(["man", "--out-dir"])
        .arg(dir.path())
        .assert()
        .success();
    for name in [
        "bento.1",
        "bento-publish.1",
        "bento-log.1",
        "bento-agent-update.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.contains(".TH"), "{name}");
    }
}

#[test]
fn every_flag_and_argument_has_help() {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let builtin = matches!(arg.get_id().as_str(), "help" | "version");
            if !builtin && !arg.is_hide_set() && arg.get_help().is_none() {
                missing.push(format!("{path} {}", arg.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() && sub.get_name() != "help" {
                missing.push(format!("{path} {} (no about)", sub.get_name()));
            }
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(&bento::cli::Cli::command(), "bento", &mut missing);
    assert!(missing.is_empty(), "no help text:\n{}", missing.join("\n"));
}

/// Runs `bento ARGS` on a pseudo-terminal (util-linux `script`), so colour and progress
/// decisions are the ones a person at a terminal gets; returns everything it printed.
fn on_terminal(dir: &std::path::Path, args: &str, no_color: bool) -> String {
    let bin = assert_cmd::cargo::cargo_bin("bento");
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &format!("{} {args}", bin.display()), "/dev/null"])
        .current_dir(dir)
        .env("NIX_CONFIG", crate::common::NIX_CONFIG)
        .env_remove("BENTO_FLEET")
        .env_remove("NO_COLOR");
    if no_color {
        cmd.env("NO_COLOR", "1");
    }
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An SGR (colour) sequence, `ESC [ digits;… m`; cursor moves of progress bars are not colour.
fn has_colour(text: &str) -> bool {
    text.split('\x1b').skip(1).any(|rest| {
        rest.strip_prefix('[').is_some_and(|r| {
            let end = r.find(|c: char| !(c.is_ascii_digit() || c == ';'));
            end.is_some_and(|i| r[i..].starts_with('m'))
        })
    })
}

#[test]
fn log_lines_honour_no_color_and_quiet_silences_them() {
    let scratch = crate::common::ScratchDir::new();
    let fleet = scratch.join("fleet");
    bento().arg("init").arg(&fleet).assert().success();
    let toml = std::fs::read_to_string(fleet.join("bento.toml")).unwrap();
    let toml = toml.replace(
        "chroot = \"/srv/bento\"",
        &format!("chroot = \"{}\"", scratch.join("chroot").display()),
    );
    std::fs::write(fleet.join("bento.toml"), toml).unwrap();
    // An unsigned fleet: publish warns on its log line before anything else.
    let coloured = on_terminal(&fleet, "publish", false);
    assert!(coloured.contains("not signed"), "{coloured}");
    assert!(
        has_colour(&coloured),
        "no colour on a terminal: {coloured:?}"
    );
    let plain = on_terminal(&fleet, "publish", true);
    assert!(plain.contains("not signed"), "{plain}");
    assert!(!has_colour(&plain), "NO_COLOR ignored: {plain:?}");
    // -q: results only. The warning stays (it is a warning), info lines and notes go.
    let out = bento()
        .current_dir(&fleet)
        .env_remove("BENTO_LOG")
        .args(["-q", "publish"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains(" INFO ") && !err.contains("note:"), "{err}");
    bento().args(["-q", "-v", "status"]).assert().failure();
}
