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
    has("ExecStart = \"${bento} agent update${flags} --config ${configFile}\";");
    has("flags = \" --force\";");
    has(&format!(
        "ExecStart = \"${{bento}} agent serve --config ${{configFile}} --exit-when-idle {}\";",
        units::PAGE_IDLE_EXIT
    ));
    has("Type = \"oneshot\";");
    has(&format!(
        "TimeoutStartSec = lib.mkDefault \"{}\";",
        units::TIMEOUT_START
    ));
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

/// nixos/server.nix passes on the generated module's `users`, `environment`, `systemd`,
/// `services.openssh` and `security.pam.loginLimits` (fixed names, so the module system can evaluate it lazily) and checks
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
        "let m = import {} {{ lib = {{ mkDefault = x: x; mkAfter = x: x; mkForce = x: x; }}; pkgs = {{ shadow = \"/shadow\"; writeText = name: text: \"/nix/store/x-${{name}}\"; }}; config = {{ }}; }}; in {{ top = builtins.attrNames m; services = builtins.attrNames m.services; firstRule = builtins.head m.systemd.tmpfiles.rules; include = m.services.openssh.settings.Include; }}",
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
            ["users", "environment", "systemd", "services", "security"]
                .contains(&name.as_str().unwrap()),
            "nixos/server.nix does not pass on `{name}`"
        );
    }
    assert_eq!(v["services"], serde_json::json!(["openssh"]));
    assert_eq!(v["firstRule"], "d /srv/fleet-chroot 0755 root root - -");
    // The Match block is an included file of its own, not extraConfig text.
    assert_eq!(v["include"], "/nix/store/x-bento-sshd.conf");
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

/// NixOS refuses user and group names of 32 characters or more (users-groups.nix), so bento
/// refuses a host whose account would be that long: when bento.toml is read, whatever the
/// command, before anything is generated.
#[test]
fn an_account_name_nixos_would_refuse_is_refused_naming_the_host() {
    let t = tempfile::tempdir().unwrap();
    let longest = "a".repeat(25); // bento- + 25 = 31 characters: the longest NixOS accepts
    let too_long = format!("{}-x", "b".repeat(24)); // 32 characters
    fs::write(
        t.path().join("bento.toml"),
        format!("[hosts.{longest}]\n[hosts.{too_long}]\n"),
    )
    .unwrap();
    for args in [
        &["server", "nixos-module", "--output", "-"][..],
        &["server", "sshd-config"][..],
    ] {
        let out = bento()
            .arg("--fleet")
            .arg(t.path())
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} accepted a 32-character account"
        );
        assert!(err.contains(&format!("host \"{too_long}\"")), "{err}");
        assert!(err.contains("bento.toml"), "{err}");
        assert!(err.contains("at most 31"), "{err}");
    }
    fs::write(t.path().join("bento.toml"), format!("[hosts.{longest}]\n")).unwrap();
    let out = bento()
        .arg("--fleet")
        .arg(t.path())
        .args(["server", "nixos-module", "--output", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&format!("users.users.\"bento-{longest}\"")),
        "{text}"
    );
}

/// The Match block, where each server puts it, judged by sshd itself (`sshd -T -C`): for a
/// host's account it wins over everything the machine's other configuration says (global
/// settings, a later `Match`, extraConfig appended after it), and nothing written after it
/// lands inside it (the machine's own users keep their settings).
#[test]
fn the_match_block_wins_for_host_accounts_and_swallows_nothing() {
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.exists() {
        eprintln!("sshd not installed (apt-get install openssh-server): skipped");
        return;
    }
    let _ = fs::create_dir_all("/run/sshd"); // sshd -T wants its privilege-separation dir
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("bento.toml"), "[hosts.alpha]\n").unwrap();
    let run = |args: &[&str]| {
        let out = bento()
            .arg("--fleet")
            .arg(t.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // sshd resolves `Match Group` through the system's group database, so the test runs
    // the block for an account and group that exist everywhere: nobody / nogroup.
    let for_nobody = |text: &str| text.replace("Match Group bento", "Match Group nogroup");
    let host_key = t.path().join("hk");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key)
        .status()
        .unwrap();
    assert!(keygen.success());
    // What the rest of the machine's configuration might say, globally and in a Match of
    // its own for everyone, after bento's block.
    let hostile_globals = "PasswordAuthentication yes\nAuthorizedKeysCommand /bin/true\n\
         AuthorizedKeysCommandUser nobody\nTrustedUserCAKeys /etc/ssh/ca.pub\n\
         AllowTcpForwarding yes\nPermitTTY yes\nX11Forwarding yes\n";
    let hostile_match = "Match all\n    PermitTTY yes\n    ChrootDirectory none\n    \
         ForceCommand /bin/sh\n    AuthorizedKeysFile .ssh/authorized_keys\n";

    // Debian: the drop-in, included first by sshd_config.
    let dropin = t.path().join("00-bento.conf");
    fs::write(&dropin, for_nobody(&run(&["server", "sshd-config"]))).unwrap();
    let debian = format!(
        "Include {}\nHostKey {}\nUsePAM no\n{hostile_globals}{hostile_match}",
        dropin.display(),
        host_key.display()
    );

    // NixOS (sshd.nix): `settings` (sorted, with the Include) first, then extraConfig, the
    // module's own lines first and everything else after, here a hostile Match at mkAfter.
    let module = run(&["server", "nixos-module", "--output", "-"]);
    let block = module
        .split("writeText \"bento-sshd.conf\" ''\n")
        .nth(1)
        .and_then(|rest| rest.split("  ''}\";").next())
        .expect("the Match block in fleet.nix");
    let included = t.path().join("bento-sshd.conf");
    fs::write(&included, for_nobody(block)).unwrap();
    let nixos = format!(
        "Include {}\nKbdInteractiveAuthentication no\nMaxStartups 100:30:200\n\
         {hostile_globals}UsePAM no\nAddressFamily any\nPort 22\nHostKey {}\n\
         Subsystem sftp internal-sftp\n{hostile_match}Match User root\n    PermitTTY yes\n",
        included.display(),
        host_key.display()
    );

    for (name, text) in [("debian", debian), ("nixos", nixos)] {
        let config = t.path().join(format!("{name}.conf"));
        fs::write(&config, text).unwrap();
        let effective = |spec: &str| {
            let out = Command::new(sshd)
                .args(["-T", "-f"])
                .arg(&config)
                .args(["-C", spec])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name}: sshd -T: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            bento::server::provision::sshd::parse_effective(&String::from_utf8_lossy(&out.stdout))
        };
        let host = effective("user=nobody,host=h.example,addr=192.0.2.1");
        for (key, want) in [
            ("chrootdirectory", "%h"),
            (
                "forcecommand",
                "internal-sftp -d / -u 0027 -P symlink,hardlink",
            ),
            ("authorizedkeysfile", "/etc/bento/authorized_keys/%u"),
            ("authorizedkeyscommand", "none"),
            ("authorizedprincipalsfile", "none"),
            ("trustedusercakeys", "none"),
            ("disableforwarding", "yes"),
            ("passwordauthentication", "no"),
            ("allowtcpforwarding", "no"),
            ("permittty", "no"),
            ("x11forwarding", "no"),
        ] {
            assert_eq!(
                host.get(key).map(String::as_str),
                Some(want),
                "{name}: {key} for a host's account"
            );
        }
        // The machine's own users are not inside bento's block.
        let admin = effective("user=root,host=h.example,addr=192.0.2.1");
        for (key, want) in [
            ("chrootdirectory", "none"),
            ("permittty", "yes"),
            ("x11forwarding", "yes"),
            ("authorizedkeyscommand", "/bin/true"),
        ] {
            assert_eq!(
                admin.get(key).map(String::as_str),
                Some(want),
                "{name}: {key} for root"
            );
        }
    }
}

/// What nixos/agent.nix must say beyond the printed units: the switch it runs must not
/// stop it, `system.autoUpgrade` must not switch the machine behind its back, and the page
/// is opt-in.
#[test]
fn the_agent_module_keeps_the_update_alive_and_alone() {
    let module = fs::read_to_string(root().join("nixos/agent.nix")).unwrap();
    let has = |needle: &str| assert!(module.contains(needle), "nixos/agent.nix lacks {needle:?}");
    has("unitConfig.X-StopOnRemoval = false;");
    has("assertion = !config.system.autoUpgrade.enable;");
    has("config.programs.ssh.package");
    assert!(!module.contains("pkgs.openssh"), "use programs.ssh.package");
    assert!(
        !module.contains("requires = [ \"bento-agent-page.socket\" ]"),
        "a restarted socket must not stop the page's update"
    );
    let page = module.split("page = {").nth(1).unwrap();
    assert!(
        page.split("port = ")
            .next()
            .unwrap()
            .contains("default = false;"),
        "the page is opt-in"
    );
}

/// The flake's `eval-server-long-host` check evaluates nixos/tests/fleet-long-host.nix: it
/// must be what bento generates from its bento.toml, for a host at the account-name limit.
#[test]
fn the_long_host_fixture_is_generated_and_at_the_limit() {
    let t = tempfile::tempdir().unwrap();
    let toml = fs::read_to_string(root().join("nixos/tests/fleet-long-host.toml")).unwrap();
    fs::write(t.path().join("bento.toml"), &toml).unwrap();
    let out = bento()
        .arg("--fleet")
        .arg(t.path())
        .args(["server", "nixos-module", "--output", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = fs::read_to_string(root().join("nixos/tests/fleet-long-host.nix")).unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        committed,
        "regenerate nixos/tests/fleet-long-host.nix with `bento server nixos-module`"
    );
    let account = "bento-abcdefghijklmnopqrstuvwxy";
    assert_eq!(account.len(), bento::protocol::MAX_ACCOUNT_LEN);
    assert!(committed.contains(&format!("users.users.\"{account}\"")));
    let eval = fs::read_to_string(root().join("nixos/tests/eval.nix")).unwrap();
    assert!(eval.contains(account));
}

/// The generated module with host keys is valid Nix (moved from the unit tier, which must
/// pass without Nix: issue #25 item 9).
#[test]
fn the_generated_fleet_module_with_keys_parses() {
    if !installed("nix-instantiate") {
        eprintln!("nix-instantiate not installed: skipped");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    fs::write(
        t.path().join("bento.toml"),
        "[server]\nchroot = \"/srv/bento\"\n\n[hosts.alpha]\nkey = \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHyvBNWS0tUTjrP3DxEx8bnhSwa7hvxOHgTSxBqYpMCy alpha@x\"\n[hosts.web-01]\n",
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
    let out = Command::new("nix-instantiate")
        .arg("--parse")
        .arg(&module)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue #23 item 7: the freshness floor is settable when the image is built, as an option
/// of the agent module written into /etc/bento/agent.toml (outside the state directory) under
/// the key the agent reads.
#[test]
fn the_agent_module_sets_the_min_serial_floor() {
    let module = fs::read_to_string(root().join("nixos/agent.nix")).unwrap();
    let has = |needle: &str| assert!(module.contains(needle), "nixos/agent.nix lacks {needle:?}");
    has("minSerial = lib.mkOption {");
    has("type = lib.types.ints.unsigned;");
    has("(lib.mkIf (cfg.minSerial > 0) { min_serial = lib.mkDefault cfg.minSerial; })");
    assert!(bento::agent::config::MACHINE_KEYS.contains(&"min_serial"));
    let config = bento::agent::config::AgentConfig::parse(
        "host = \"alpha\"\nserver = \"file:///srv\"\nmin_serial = 42\n",
        Path::new("agent.toml"),
    )
    .unwrap();
    assert_eq!(config.min_serial, 42);
}
