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

/// Every leaf command (`publish`, `server check`, …) with the long flags it takes.
fn leaf_flags() -> Vec<(String, Vec<String>)> {
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<(String, Vec<String>)>) {
        let subs: Vec<&clap::Command> = cmd
            .get_subcommands()
            .filter(|s| s.get_name() != "help")
            .collect();
        if subs.is_empty() {
            let flags = cmd
                .get_arguments()
                .filter_map(|a| a.get_long().map(str::to_owned))
                .collect();
            out.push((path.trim().to_owned(), flags));
        }
        for sub in subs {
            walk(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }
    let mut cmd = bento::cli::Cli::command();
    cmd.build();
    let mut out = Vec::new();
    walk(&cmd, "", &mut out);
    out
}

fn taking(flag: &str) -> Vec<String> {
    leaf_flags()
        .into_iter()
        .filter(|(_, flags)| flags.iter().any(|f| f == flag))
        .map(|(name, _)| name)
        .collect()
}

#[test]
fn fleet_chroot_and_json_are_on_exactly_the_commands_that_use_them() {
    let fleet_commands = [
        "publish",
        "build",
        "status",
        "log",
        "diff",
        "flake-update",
        "rollout",
        "trigger",
        "rollback",
        "journal",
        "versions",
        "secret edit",
        "secret show",
        "secret encrypt",
        "secret rekey",
        "server nixos-module",
        "server sshd-config",
        "server sync-accounts",
        "server check",
        "server s3-policy",
        "host add",
        "agent-config",
    ];
    assert_eq!(taking("fleet"), fleet_commands, "--fleet");
    // Of those, the ones that read the chroot.
    let chroot_commands = [
        "publish",
        "build",
        "status",
        "log",
        "diff",
        "rollout",
        "trigger",
        "rollback",
        "journal",
        "versions",
        "server sync-accounts",
        "server check",
    ];
    assert_eq!(taking("chroot"), chroot_commands, "--chroot");
    let json = taking("json");
    for c in [
        "publish",
        "build",
        "status",
        "log",
        "diff",
        "flake-update",
        "rollout",
        "trigger",
        "rollback",
        "journal",
        "versions",
        "server sync-accounts",
        "server check",
        "agent update",
        "agent status",
        "agent check",
        "agent-config",
    ] {
        assert!(json.contains(&c.to_owned()), "{c} has no --json: {json:?}");
    }
    // `--output` is `-o` wherever it is.
    let mut cmd = bento::cli::Cli::command();
    cmd.build();
    fn outputs(cmd: &clap::Command, path: &str, bad: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            if a.get_long() == Some("output") && a.get_short() != Some('o') {
                bad.push(path.to_owned());
            }
        }
        for s in cmd.get_subcommands() {
            outputs(s, &format!("{path} {}", s.get_name()), bad);
        }
    }
    let mut bad = Vec::new();
    outputs(&cmd, "bento", &mut bad);
    assert!(bad.is_empty(), "--output without -o: {bad:?}");
    // Both places of --fleet work, the command's own winning.
    let scratch = crate::common::ScratchDir::new();
    let fleet = scratch.join("fleet");
    bento().arg("init").arg(&fleet).assert().success();
    for args in [
        vec![
            "--fleet".into(),
            fleet.display().to_string(),
            "server".into(),
            "sshd-config".into(),
        ],
        vec![
            "server".into(),
            "sshd-config".into(),
            "--fleet".into(),
            fleet.display().to_string(),
        ],
        vec![
            "--fleet".into(),
            "/nonexistent".into(),
            "server".into(),
            "sshd-config".into(),
            "--fleet".into(),
            fleet.display().to_string(),
        ],
    ] {
        bento().args(&args).assert().success();
    }
}

/// (stdout, stderr) of a failing `bento ARGS`.
fn failing(cmd: &mut assert_cmd::Command) -> (String, String) {
    let out = cmd.assert().failure().get_output().clone();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn error_messages_say_what_to_do_once() {
    let scratch = crate::common::ScratchDir::new();
    // A missing file: its cause once, not "(os error 2): No such file … (os error 2)".
    let missing = scratch.join("nope/agent.toml");
    let (_, err) = failing(bento().args(["agent", "update", "--config"]).arg(&missing));
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");

    // A missing identity_file is named before any connection is tried.
    let config = scratch.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "host = \"alpha\"\nserver = \"sftp://bento-alpha@127.0.0.1:9\"\nidentity_file = \"{}\"\nstate_dir = \"{}\"\n",
            scratch.join("no-such-key").display(),
            scratch.join("state").display()
        ),
    )
    .unwrap();
    let out = bento()
        .args(["agent", "update", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "identity_file {}",
            scratch.join("no-such-key").display()
        )),
        "{text}"
    );
    assert!(!text.contains("Permission denied (publickey)"), "{text}");

    // Not root: told to run as root, before anything else.
    let bin = assert_cmd::cargo::cargo_bin("bento");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["agent", "update", "--config", "/etc/bento/agent.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("must run as root") && err.contains("sudo"),
        "{err}"
    );
}

#[test]
fn keygen_says_where_it_writes_and_makes_the_cache_key() {
    let scratch = crate::common::ScratchDir::new();
    let key = scratch.join("keys/signing_key");
    let out = bento()
        .args(["keygen", "-o"])
        .arg(&key)
        .assert()
        .success()
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&out.stderr);
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.contains(&format!(
            "writing the fleet signing key to {}",
            key.display()
        )),
        "{err}"
    );
    assert!(err.contains(&format!("{}.pub", key.display())), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ssh-ed25519 "));
    // Never over an existing key.
    let (_, err) = failing(bento().args(["keygen", "-o"]).arg(&key));
    assert!(err.contains(&key.display().to_string()), "{err}");

    let cache = scratch.join("keys/cache-key");
    let out = bento()
        .args([
            "keygen",
            "--cache",
            "--key-name",
            "bento.example.org-1",
            "-o",
        ])
        .arg(&cache)
        .assert()
        .success()
        .get_output()
        .clone();
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(public.starts_with("bento.example.org-1:"), "{public}");
    let secret = std::fs::read_to_string(&cache).unwrap();
    assert!(secret.starts_with("bento.example.org-1:"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "writing the binary-cache key bento.example.org-1 to {}",
            cache.display()
        )) && err.contains(&format!("[server] cache_key = \"{}\"", cache.display()))
            && err.contains(&format!("cache_keys = [\"{public}\"]")),
        "{err}"
    );
    // Nix agrees on the public half.
    let nix = Command::new("nix")
        .args(["key", "convert-secret-to-public"])
        .env("NIX_CONFIG", crate::common::NIX_CONFIG)
        .stdin(std::fs::File::open(&cache).unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&nix.stdout).trim(), public);
}

/// Every command's `--help` and man page has an EXIT STATUS section listing exactly the
/// codes `cli::exit` defines for it (the agent's from `RunResult`, status's 2, …).
#[test]
fn every_help_and_man_page_lists_the_exit_codes_the_code_defines() {
    fn paths(cmd: &clap::Command, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        out.push(path.clone());
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() == "help" {
                continue;
            }
            path.push(sub.get_name().to_owned());
            paths(sub, path, out);
            path.pop();
        }
    }
    let mut all = Vec::new();
    paths(&bento::cli::Cli::command(), &mut Vec::new(), &mut all);
    assert!(all.iter().any(|p| p == &["agent", "update"]));
    let dir = tempfile::tempdir().unwrap();
    bento()
        .args(["man", "--out-dir"])
        .arg(dir.path())
        .assert()
        .success();
    let agent: Vec<u8> = bento::cli::exit::codes(&["agent", "update"])
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(agent, [0, 10, 11, 12, 13, 1]);
    assert!(bento::cli::exit::codes(&["status"])
        .iter()
        .any(|c| c.0 == 2));
    for path in all {
        let refs: Vec<&str> = path.iter().map(String::as_str).collect();
        let codes = bento::cli::exit::codes(&refs);
        let mut args = refs.clone();
        args.push("--help");
        let help = stdout(&args);
        let section = help
            .split("EXIT STATUS:\n")
            .nth(1)
            .unwrap_or_else(|| panic!("bento {}: no EXIT STATUS in --help", refs.join(" ")));
        let listed: Vec<u8> = section
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .filter(|l| l.starts_with("  ") && !l.starts_with("    "))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        let wanted: Vec<u8> = codes.iter().map(|c| c.0).collect();
        assert_eq!(listed, wanted, "bento {} --help", refs.join(" "));
        let name = std::iter::once("bento")
            .chain(refs.iter().copied())
            .collect::<Vec<_>>()
            .join("-");
        let page = std::fs::read_to_string(dir.path().join(format!("{name}.1")))
            .unwrap_or_else(|e| panic!("{name}.1: {e}"));
        let section = page
            .split(".SH \"EXIT STATUS\"")
            .nth(1)
            .unwrap_or_else(|| panic!("{name}.1: no EXIT STATUS section"));
        let section = section.split("\n.SH").next().unwrap();
        for code in &wanted {
            assert!(
                section.contains(&format!("\\fB{code}\\fR")),
                "{name}.1: {code}"
            );
        }
    }
}

/// `bento log <TAB>`, `--host <TAB>` and `--on <TAB>` complete the hosts (and `@tags` for
/// `--on`) of the fleet named on the line, in bash, through the generated script.
#[test]
fn completions_offer_the_fleets_hosts_and_tags() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(
        t.path().join("bento.toml"),
        "[hosts.alpha]\ntags = [\"web\"]\n[hosts.beta]\n",
    )
    .unwrap();
    let fleet = t.path().display().to_string();
    let listed = stdout(&[
        "complete", "hosts", "--tags", "--", "bento", "--fleet", &fleet,
    ]);
    assert_eq!(listed, "alpha\nbeta\n@web\n");
    let script = stdout(&["completions", "bash"]);
    let bin = assert_cmd::cargo::cargo_bin("bento");
    let complete = |line: &str| {
        let out = Command::new("bash")
            .args([
                "-c",
                "bento() { \"$BENTO_BIN\" \"$@\"; }; eval \"$BENTO_COMPLETION\"; read -ra COMP_WORDS <<< \"$LINE\"; COMP_WORDS+=(\"\"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); _bento_fleet bento \"\" \"${COMP_WORDS[COMP_CWORD-1]}\"; printf '%s\\n' \"${COMPREPLY[@]}\"",
            ])
            .env("BENTO_COMPLETION", &script)
            .env("BENTO_BIN", &bin)
            .env("LINE", line)
            .env_remove("BENTO_FLEET")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        complete(&format!("bento --fleet {fleet} log")),
        "alpha\nbeta\n"
    );
    assert_eq!(
        complete(&format!("bento status --fleet {fleet} --on")),
        "alpha\nbeta\n@web\n"
    );
    assert_eq!(
        complete(&format!("bento status --fleet {fleet} --host")),
        "alpha\nbeta\n"
    );
}
