//! `bento build`, `publish --build`, `bento diff` and `bento flake-update` with real Nix on
//! the toy fleet (flake hosts alpha and beta, classic host classic1).

use std::fs;
use std::path::{Path, PathBuf};

use bento::nix::StorePath;
use bento::protocol::layout::{self, Chroot};
use bento::protocol::manifest::{Build, ConfigEntry, Digest, Manifest, RelPath};
use bento::protocol::report::Heartbeat;
use bento::protocol::HostName;
use bento::server::build::record;
use predicates::str::contains;

use crate::common::{bento, unique_prefix, Accounts, FixtureFleet, ScratchDir, NIX_CONFIG};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/toy")
}

/// `bento` with a `<nixpkgs/nixos>` for classic hosts.
fn bento_nix() -> assert_cmd::Command {
    let mut cmd = bento();
    cmd.env(
        "NIX_PATH",
        format!("nixpkgs={}", fixtures().join("nixpkgs").display()),
    );
    cmd
}

struct Env {
    scratch: ScratchDir,
    fleet: FixtureFleet,
    prefix: String,
}

impl Env {
    fn new() -> Self {
        let scratch = ScratchDir::new();
        let prefix = unique_prefix();
        let fleet = FixtureFleet::new(&scratch.join("fleet"), &prefix);
        Self {
            scratch,
            fleet,
            prefix,
        }
    }

    fn chroot(&self) -> Chroot {
        Chroot::new(self.scratch.join("chroot"))
    }

    fn run(&self, args: &[&str]) -> assert_cmd::assert::Assert {
        bento_nix()
            .arg("--fleet")
            .arg(&self.fleet.root)
            .args(args)
            .arg("--chroot")
            .arg(&self.chroot().root)
            .assert()
    }

    fn record(&self, host: &str) -> record::BuildRecord {
        record::read(&self.chroot(), &HostName::new(host).unwrap())
            .unwrap()
            .unwrap_or_else(|| panic!("no build record for {host}"))
    }
}

#[test]
fn build_records_each_hosts_system_and_publish_build_puts_it_in_the_manifest() {
    let env = Env::new();
    let out = env
        .run(&["build", "--jobs", "2"])
        .success()
        .get_output()
        .clone();
    let text = String::from_utf8(out.stdout).unwrap();
    for host in ["alpha", "beta", "classic1"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(host))
            .unwrap_or_else(|| panic!("no line for {host}:\n{text}"));
        assert!(line.contains("built"), "{line}");
        let rec = env.record(host);
        let system = rec.system.expect("system recorded");
        assert!(rec.built);
        assert_eq!(system.name(), format!("nixos-system-{host}-1"));
        assert!(system
            .as_path()
            .join("bin/switch-to-configuration")
            .exists());
        assert!(line.contains(system.as_str()), "{line}");
    }
    // The secret of classic1 never went into the store: the build saw only its config.
    let classic = env.record("classic1").system.unwrap();
    assert_eq!(
        fs::read_to_string(classic.as_path().join("hostname")).unwrap(),
        "classic1\n"
    );

    // publish --build: the manifests carry the systems.
    let _accounts = Accounts::create(&env.prefix, &["alpha", "beta", "classic1"]);
    env.run(&["publish", "--build"]).success();
    for host in ["alpha", "beta", "classic1"] {
        let dir = env.chroot().host_dir(&HostName::new(host).unwrap());
        let (_, m) = bento::server::publish::read_current(&dir).expect("published");
        assert_eq!(m.system, env.record(host).system, "{host}");
    }
    // status takes them as expected systems; nobody has reported yet.
    let out = env
        .run(&["status", "--json"])
        .success()
        .get_output()
        .clone();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for r in rows.as_array().unwrap() {
        assert_eq!(r["state"], "new");
        assert_eq!(r["expected_from"], "manifest");
        assert!(r["expected_system"]
            .as_str()
            .unwrap()
            .starts_with("/nix/store/"));
    }
}

#[test]
fn a_failing_build_names_its_host_and_the_others_go_on() {
    let env = Env::new();
    env.fleet.write(
        "hosts/broken/configuration.nix",
        "{ ... }: { hostName = \"broken\"; version = builtins.abort \"kaput: no such option\"; }\n",
    );
    let out = env.run(&["build"]).code(1).get_output().clone();
    let text = String::from_utf8(out.stdout).unwrap();
    let broken = text.lines().find(|l| l.starts_with("broken")).unwrap();
    assert!(broken.contains("failed"), "{text}");
    assert!(text.contains("kaput: no such option"), "{text}");
    assert!(env.record("alpha").built);
    assert!(
        record::read(&env.chroot(), &HostName::new("broken").unwrap())
            .unwrap()
            .is_none()
    );

    // publish --build publishes those that built, not the broken one.
    let _accounts = Accounts::create(&env.prefix, &["alpha", "beta", "classic1", "broken"]);
    env.run(&["publish", "--build"])
        .code(1)
        .stderr(contains("not publishing broken"));
    let chroot = env.chroot();
    assert!(bento::server::publish::read_current(
        &chroot.host_dir(&HostName::new("alpha").unwrap())
    )
    .is_some());
    assert!(bento::server::publish::read_current(
        &chroot.host_dir(&HostName::new("broken").unwrap())
    )
    .is_none());
}

#[test]
fn dry_build_records_the_derivation_without_building() {
    let env = Env::new();
    env.fleet
        .write("common/base.nix", "{ version = \"dry-run-only\"; }\n");
    let out = env
        .run(&["build", "--dry", "--host", "alpha", "--json"])
        .success()
        .get_output()
        .clone();
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results.as_array().unwrap().len(), 1);
    assert_eq!(results[0]["outcome"], "evaluated");
    let rec = env.record("alpha");
    assert!(!rec.built);
    let drv = rec.drv.expect("drv recorded");
    assert!(
        drv.as_str()
            .ends_with("nixos-system-alpha-dry-run-only.drv"),
        "{drv}"
    );
    let system = rec.system.expect("output path recorded");
    assert_eq!(system.name(), "nixos-system-alpha-dry-run-only");
    assert!(!system.as_path().exists(), "not built");

    env.run(&["build", "--host", "nosuch"])
        .code(1)
        .stderr(contains("no host named nosuch"));
}

#[test]
fn switch_applies_the_build_to_a_profile_after_confirmation() {
    let env = Env::new();
    let profile = env.scratch.join("profiles/system");
    fs::create_dir_all(profile.parent().unwrap()).unwrap();
    let log = env.scratch.join("activation.log");
    // Without a terminal and without --yes it refuses, touching nothing.
    bento_nix()
        .arg("--fleet")
        .arg(&env.fleet.root)
        .args(["build", "--switch", "--host", "alpha", "--profile"])
        .arg(&profile)
        .arg("--chroot")
        .arg(env.chroot().root)
        .env("BENTO_TEST_ACTIVATION_LOG", &log)
        .assert()
        .code(1)
        .stderr(contains("--yes"));
    assert!(!log.exists());
    bento_nix()
        .arg("--fleet")
        .arg(&env.fleet.root)
        .args(["build", "--switch", "--yes", "--host", "alpha", "--profile"])
        .arg(&profile)
        .arg("--chroot")
        .arg(env.chroot().root)
        .env("BENTO_TEST_ACTIVATION_LOG", &log)
        .assert()
        .success();
    let system = env.record("alpha").system.unwrap();
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        format!("switch {system}\n")
    );
    assert_eq!(
        bento::nix::profile_target(&profile).unwrap().as_ref(),
        Some(&system)
    );
    env.run(&["build", "--switch", "--yes"])
        .code(1)
        .stderr(contains("exactly one --host"));
}

/// Builds a toy system with real Nix.
fn toy_system(host: &str, version: &str, kernel: &str) -> StorePath {
    let expr = format!(
        "(import {}/lib.nix).mkSystem {{ hostName = \"{host}\"; version = \"{version}\"; kernelVersion = \"{kernel}\"; }}",
        fixtures().display()
    );
    let out = std::process::Command::new("nix-build")
        .args(["--no-out-link", "-E", &expr])
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    StorePath::new(String::from_utf8(out.stdout).unwrap().trim()).unwrap()
}

/// A chroot where `host` runs `running` and its live version expects `expected`.
fn place(chroot: &Chroot, host: &str, running: Option<&str>, expected: &StorePath) {
    let m = Manifest {
        format: 1,
        host: HostName::new(host).unwrap(),
        created: "2026-11-25T12:00:00Z".parse().unwrap(),
        serial: 0,
        source_commit: None,
        dirty: false,
        build: Build::Flake,
        system: Some(expected.clone()),
        config: vec![ConfigEntry::Directory {
            path: RelPath::new("x").unwrap(),
        }],
        tree: None,
        files: vec![],
    };
    let dir = chroot.host_dir(&HostName::new(host).unwrap());
    fs::create_dir_all(dir.join("manifests")).unwrap();
    fs::create_dir_all(dir.join("logs")).unwrap();
    let digest = m.digest();
    fs::write(layout::manifest(&dir, &digest), m.to_bytes()).unwrap();
    fs::write(layout::current(&dir), layout::current_text(&digest)).unwrap();
    if let Some(running) = running {
        let hb = Heartbeat {
            format: 1,
            host: HostName::new(host).unwrap(),
            time: bento::protocol::Timestamp::seconds(std::time::SystemTime::now()),
            version: Some(Digest::of(b"older")),
            system: Some(running.to_owned()),
            last_outcome: None,
            last_report: None,
            agent_version: "0.1.0".into(),
            reboot_pending: false,
            auto_updated: false,
            last_success: None,
            verifies_signatures: None,
            serial: None,
            stale: None,
            clock_offset_s: None,
            formats: vec![],
        };
        fs::write(dir.join("logs/heartbeat.json"), hb.to_bytes()).unwrap();
    }
}

#[test]
fn diff_shows_package_changes_between_two_real_generations() {
    let scratch = ScratchDir::new();
    let fleet = scratch.join("fleet");
    let chroot = Chroot::new(scratch.join("chroot"));
    fs::create_dir_all(&fleet).unwrap();
    fs::write(
        fleet.join("bento.toml"),
        "[hosts.alpha]\n[hosts.newbie]\n[hosts.ghost]\n[hosts.steady]\n",
    )
    .unwrap();
    let gen1 = toy_system("alpha", "1", "6.1.0");
    let gen2 = toy_system("alpha", "2", "6.1.1");
    place(&chroot, "alpha", Some(gen1.as_str()), &gen2);
    place(&chroot, "newbie", None, &gen2);
    place(
        &chroot,
        "ghost",
        Some("/nix/store/00000000000000000000000000000000-nixos-system-ghost-1"),
        &gen2,
    );
    place(&chroot, "steady", Some(gen2.as_str()), &gen2);
    let diff = |args: &[&str]| {
        let mut cmd = bento();
        cmd.arg("--fleet")
            .arg(&fleet)
            .arg("diff")
            .arg("--chroot")
            .arg(&chroot.root)
            .args(args)
            // No nvd: the built-in `nix store diff-closures` path.
            .env("PATH", "/usr/local/bin:/usr/bin:/bin");
        cmd
    };
    let out = diff(&["--host", "alpha"])
        .assert()
        .success()
        .get_output()
        .clone();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(&format!(
            "alpha: {} (running) → {} (expected)\n",
            gen1.short_hash(8),
            gen2.short_hash(8)
        )),
        "{text}"
    );
    let has = |re: &[&str]| text.lines().any(|l| re.iter().all(|w| l.contains(w)));
    assert!(has(&["changed", "linux", "6.1.0 → 6.1.1"]), "{text}");
    assert!(has(&["changed", "nixos-system-alpha", "1 → 2"]), "{text}");
    assert!(has(&["closure size:", "→"]), "{text}");

    let out = diff(&[]).assert().code(1).get_output().clone();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("newbie: has never reported its running system"),
        "{text}"
    );
    assert!(text.contains("its running system /nix/store/00000000000000000000000000000000-nixos-system-ghost-1 is not in this server's Nix store"), "{text}");
    assert!(
        text.contains(&format!(
            "steady: runs the expected system {}; nothing changes",
            gen2.short_hash(8)
        )),
        "{text}"
    );

    // With nvd on PATH, its report is shown.
    let bin = scratch.join("bin");
    fs::create_dir_all(&bin).unwrap();
    fs::write(bin.join("nvd"), "#!/bin/sh\necho \"nvd stub: $*\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(bin.join("nvd"), fs::Permissions::from_mode(0o755)).unwrap();
    let out = diff(&["--host", "alpha"])
        .env(
            "PATH",
            format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display()),
        )
        .assert()
        .success()
        .get_output()
        .clone();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&format!("nvd stub: diff {gen1} {gen2}")),
        "{text}"
    );
}

#[test]
fn flake_update_reports_what_changed_per_directory() {
    let env = Env::new();
    let src = env.scratch.join("shared-src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("motd"), "hello\n").unwrap();
    env.fleet.write(
        "hosts/pinned/flake.nix",
        &format!(
            "{{\n  inputs.shared = {{ url = \"path:{}\"; flake = false; }};\n  outputs = {{ self, shared }}: {{\n    nixosConfigurations.pinned.config.system.build.toplevel =\n      (import ./common/lib.nix).mkSystem {{ hostName = \"pinned\"; payload = builtins.readFile (shared + \"/motd\"); }};\n  }};\n}}\n",
            src.display()
        ),
    );
    env.fleet.link("../../common", "hosts/pinned/common");
    // A secret beside the flake must not be copied into the store to lock it.
    let marker = format!("pinned secret {}", env.scratch.path.display());
    env.fleet
        .write("hosts/pinned/files/pinned/etc/key", &marker);
    let update = |args: &[&str]| {
        bento()
            .arg("--fleet")
            .arg(&env.fleet.root)
            .arg("flake-update")
            .args(args)
            .assert()
    };
    let out = update(&[]).success().get_output().clone();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("hosts/pinned") && l.contains("shared") && l.contains("added")),
        "{text}"
    );
    assert!(env.fleet.path("hosts/pinned/flake.lock").is_file());
    let grep = std::process::Command::new("grep")
        .args(["-rlF", &marker, "/nix/store"])
        .output()
        .unwrap();
    assert!(
        grep.stdout.is_empty(),
        "secret copied into the store: {}",
        String::from_utf8_lossy(&grep.stdout)
    );
    // hosts/multi has no inputs: its lock changes nothing worth reporting.
    assert!(
        text.lines()
            .any(|l| l.starts_with("hosts/multi") && l.ends_with("unchanged")),
        "{text}"
    );

    let out = update(&["shared"]).success().get_output().clone();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("hosts/pinned") && l.ends_with("unchanged")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("hosts/multi") && l.contains("no input named shared")),
        "{text}"
    );

    fs::write(src.join("motd"), "changed\n").unwrap();
    let out = update(&["shared"]).success().get_output().clone();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("hosts/pinned")
            && l.contains("shared")
            && l.contains("updated")
            && l.contains("→")),
        "{text}"
    );
    update(&["nosuchinput"]).code(1).stderr(contains(
        "no flake directory has an input named nosuchinput",
    ));
}
