//! The NixOS side, as far as it can be checked without nixpkgs: every `.nix` file parses,
//! the units `bento agent print-units` writes pass `systemd-analyze verify`, the module
//! (nixos/agent.nix) defines the same units, and the generated fleet module sets only what
//! nixos/server.nix passes on.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use bento::agent::units;

use crate::common::bento;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn installed(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok()
}

/// Every `.nix` file of the repository, outside build output and VCS directories.
fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let ty = e.file_type().unwrap();
        if ty.is_dir() {
            if name == "target" || name.starts_with('.') || name == "node_modules" {
                continue;
            }
            nix_files(&e.path(), out);
        } else if ty.is_file() && name.ends_with(".nix") {
            out.push(e.path());
        }
    }
}

#[test]
fn every_nix_file_parses() {
    if !installed("nix-instantiate") {
        eprintln!("nix-instantiate not installed (apt-get install nix-bin): parse check skipped");
        return;
    }
    let mut files = Vec::new();
    nix_files(root(), &mut files);
    for want in [
        "flake.nix",
        "nixos/agent.nix",
        "nixos/server.nix",
        "nixos/package.nix",
    ] {
        assert!(files.contains(&root().join(want)), "{want} exists");
    }
    let mut failures = Vec::new();
    for f in &files {
        let out = Command::new("nix-instantiate")
            .arg("--parse")
            .arg(f)
            .output()
            .unwrap();
        if !out.status.success() {
            failures.push(format!(
                "{}: {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn print_units(dir: &Path, extra: &[&str]) {
    bento()
        .args(["agent", "print-units", "--output"])
        .arg(dir)
        .arg("--bento")
        .arg(assert_cmd::cargo::cargo_bin("bento"))
        .args(extra)
        .assert()
        .success();
}

fn verify(dir: &Path) -> std::process::Output {
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify");
    for name in units::render(&options()).iter().map(|(n, _)| *n) {
        cmd.arg(dir.join(name));
    }
    cmd.output().unwrap()
}

fn options() -> units::UnitOptions {
    units::UnitOptions {
        bento: "/x".into(),
        config: "/etc/bento/agent.toml".into(),
        interval: units::DEFAULT_INTERVAL.into(),
        randomized_delay: units::DEFAULT_RANDOMIZED_DELAY.into(),
        listen: bento::agent::page::DEFAULT_LISTEN.parse().unwrap(),
    }
}

#[test]
fn printed_units_pass_systemd_analyze_verify() {
    let t = tempfile::tempdir().unwrap();
    print_units(t.path(), &[]);
    let names: Vec<_> = fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    if !installed("systemd-analyze") {
        eprintln!("systemd-analyze not installed: unit verification skipped");
        return;
    }
    let out = verify(t.path());
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The check has teeth: a calendar expression systemd cannot read fails it.
    let bad = tempfile::tempdir().unwrap();
    print_units(bad.path(), &["--interval", "every other tuesday"]);
    let out = verify(bad.path());
    assert!(!out.status.success(), "a bad OnCalendar= is caught");
}

#[test]
fn print_units_shows_every_unit_on_stdout() {
    let out = bento()
        .args([
            "agent",
            "print-units",
            "--bento",
            "/usr/bin/bento",
            "--listen",
            "127.0.0.1:8080",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "# bento-agent.service\n",
        "ExecStart=/usr/bin/bento agent update --config /etc/bento/agent.toml\n",
        "# bento-agent.timer\n",
        "OnCalendar=*:0/15\n",
        "# bento-agent-page.socket\n",
        "ListenStream=127.0.0.1:8080\n",
        "# bento-agent-page.service\n",
    ] {
        assert!(text.contains(want), "{want:?} in:\n{text}");
    }
}

/// What `print-units` renders and what nixos/agent.nix declares must not drift apart.
#[test]
fn the_module_defines_the_printed_units() {
    let module = fs::read_to_string(root().join("nixos/agent.nix")).unwrap();
    let has = |needle: &str| assert!(module.contains(needle), "nixos/agent.nix lacks {needle:?}");
    for (key, value) in units::HARDENING {
        match *value {
            "yes" => has(&format!("{key} = true;")),
            v => has(&format!("{key} = \"{v}\";")),
        }
    }
    has(&format!(
        "SuccessExitStatus = \"{}\";",
        units::SUCCESS_EXIT_STATUS
    ));
    has("ExecStart = \"${bento} agent update --config ${configFile}\";");
    has(&format!(
        "ExecStart = \"${{bento}} agent serve --config ${{configFile}} --exit-when-idle {}\";",
        units::PAGE_IDLE_EXIT
    ));
    has("Type = \"oneshot\";");
    has("restartIfChanged = false;");
    has("stopIfChanged = false;");
    has(&format!(
        "default = \"{}\";",
        units::DEFAULT_RANDOMIZED_DELAY
    ));
    has("FixedRandomDelay = true;");
    has("listenStreams = [ \"127.0.0.1:${toString cfg.page.port}\" ];");
    let port = bento::agent::page::DEFAULT_LISTEN
        .rsplit(':')
        .next()
        .unwrap();
    has(&format!("default = {port};"));
    // The default interval (15 minutes) becomes the documented calendar expression.
    assert_eq!(units::DEFAULT_INTERVAL, "*:0/15");
    has("intervalSecs = if hostSettings == null then 900");
    has("\"*:0/${toString (s / 60)}\"");
}

/// nixos/server.nix passes on the generated module's `users`, `environment`, `systemd` and
/// `services.openssh` (fixed names, so the module system can evaluate it lazily) and checks
/// the chroot by its first tmpfiles rule. Evaluated with the two lib functions it calls.
#[test]
fn the_generated_fleet_module_sets_only_what_the_server_module_passes_on() {
    if !installed("nix-instantiate") {
        eprintln!("nix-instantiate not installed: skipped");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    fs::write(
        t.path().join("bento.toml"),
        "[server]\nchroot = \"/srv/fleet-chroot\"\n\n[hosts.alpha]\n[hosts.beta]\n",
    )
    .unwrap();
    let module = t.path().join("fleet.nix");
    bento()
        .arg("--fleet")
        .arg(t.path())
        .args(["server", "nixos-module", "--output"])
        .arg(&module)
        .assert()
        .success();
    let expr = format!(
        "let m = import {} {{ lib = {{ mkDefault = x: x; mkAfter = x: x; mkForce = x: x; }}; pkgs = {{ shadow = \"/shadow\"; }}; config = {{ }}; }}; in {{ top = builtins.attrNames m; services = builtins.attrNames m.services; firstRule = builtins.head m.systemd.tmpfiles.rules; }}",
        module.display()
    );
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E", &expr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for name in v["top"].as_array().unwrap() {
        assert!(
            ["users", "environment", "systemd", "services"].contains(&name.as_str().unwrap()),
            "nixos/server.nix does not pass on `{name}`"
        );
    }
    assert_eq!(v["services"], serde_json::json!(["openssh"]));
    assert_eq!(v["firstRule"], "d /srv/fleet-chroot 0755 root root - -");
    let server = fs::read_to_string(root().join("nixos/server.nix")).unwrap();
    assert!(server.contains("\"d ${cfg.chroot} 0755 root root - -\""));
}

/// The examples in docs/nixos.md are valid Nix: whole expressions, or attribute bindings
/// (as they would appear inside a configuration's `{ … }`).
#[test]
fn the_documented_examples_parse() {
    if !installed("nix-instantiate") {
        eprintln!("nix-instantiate not installed: skipped");
        return;
    }
    let doc = fs::read_to_string(root().join("docs/nixos.md")).unwrap();
    let blocks: Vec<&str> = doc
        .split("```nix\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(
        blocks.len() >= 3,
        "the workstation, server and backup examples"
    );
    for block in blocks {
        let parses = |text: &str| {
            Command::new("nix-instantiate")
                .args(["--parse", "-E", text])
                .output()
                .unwrap()
                .status
                .success()
        };
        assert!(
            parses(block) || parses(&format!("{{ {block} }}")),
            "docs/nixos.md example does not parse:\n{block}"
        );
    }
}
