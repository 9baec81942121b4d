//! Issue #12, the agent's side of `build_on = "server"`, over the real sshd and real Nix: the
//! host runs the system the server built without evaluating or building anything (its store
//! never had the system: the test deletes the exported paths before the agent runs, and the
//! agent's Nix may not build), a later version fetches only the NAR of the one path that
//! changed (counted by the relay), and a tampered NAR or a narinfo signed by another key is
//! refused before anything on the machine changes, with a report saying why. `bento rollout`
//! builds and exports such a host as `bento publish` does.

use std::fs;
use std::path::Path;
use std::process::Command;

use bento::protocol::narinfo::{self, NarInfo};
use bento::protocol::report::Outcome;

use crate::agent::{code, text, Machine, EXIT_FAILED, EXIT_NOOP, EXIT_UPDATED};
use crate::common::relay::Relay;
use crate::common::sshd::Sshd;
use crate::common::{bento, ScratchDir, NIX_CONFIG};
use crate::delivery::cache_key;

/// Bytes of each toy dependency: incompressible, so neither zstd nor SSH shrink them.
const BLOB: usize = 64 * 1024;

/// A flake host whose toplevel refers to `blobs` paths of [`BLOB`] random bytes each; `tag`
/// makes every path this test's own (the store is shared with other tests, and this one
/// deletes paths). Only `version.nix` changes the toplevel alone.
fn flake(tag: &str, blobs: usize) -> String {
    format!(
        r#"{{
  outputs = {{ self }}:
    let
      v = import ./version.nix;
      sh = name: script: derivation {{
        inherit name;
        system = "x86_64-linux";
        builder = "/bin/sh";
        args = [ "-c" script ];
        PATH = "/usr/bin:/bin";
      }};
      blobs = builtins.genList (i: sh "blob-{tag}-${{toString i}}"
        "mkdir $out; head -c {BLOB} /dev/urandom > $out/data") {blobs};
      links = builtins.concatStringsSep "\n" (map (b: "ln -s ${{b}} $out/${{b.name}}") blobs);
    in {{
      nixosConfigurations.alpha.config.system.build.toplevel = sh "nixos-system-alpha-{tag}-${{v.version}}" ''
        mkdir -p $out/bin
        ${{links}}
        printf '#!/bin/sh\necho "$1 %s" >> "''${{BENTO_TEST_ACTIVATION_LOG:-/tmp/bento-test-activation.log}}"\n' "$out" > $out/bin/switch-to-configuration
        chmod +x $out/bin/switch-to-configuration
      '';
    }};
}}
"#
    )
}

/// Nix on the host may not build anything (`max-jobs = 0`): a run that tried would fail.
pub(crate) fn no_builds() -> String {
    format!("{NIX_CONFIG}\nmax-jobs = 0")
}

pub(crate) struct Bed {
    pub(crate) sshd: Sshd,
    _keys: ScratchDir,
    pub(crate) public: String,
    pub(crate) secret: std::path::PathBuf,
}

impl Bed {
    pub(crate) fn new(blobs: usize) -> Bed {
        let sshd = Sshd::start(&["alpha"]);
        let keys = ScratchDir::new();
        let (secret, public) = cache_key(&keys.path);
        let dir = sshd.fleet().join("hosts/alpha");
        for f in ["configuration.nix", "files.toml"] {
            let _ = fs::remove_file(dir.join(f));
        }
        let _ = fs::remove_dir_all(dir.join("files"));
        let tag = sshd.prefix.trim_end_matches('-').to_owned();
        fs::write(dir.join("flake.nix"), flake(&tag, blobs)).unwrap();
        fs::write(dir.join("version.nix"), "{ version = \"1\"; }\n").unwrap();
        let toml = fs::read_to_string(sshd.fleet().join("bento.toml")).unwrap();
        let toml = toml
            .replacen(
                "[server]\n",
                &format!("[server]\ncache_key = \"{}\"\n", secret.display()),
                1,
            )
            .replacen(
                "[hosts.alpha]\n",
                "[hosts.alpha]\nbuild_on = \"server\"\n",
                1,
            );
        fs::write(sshd.fleet().join("bento.toml"), toml).unwrap();
        Bed {
            sshd,
            _keys: keys,
            public,
            secret,
        }
    }

    /// `bento publish` (which builds and exports the server-built host); the live system.
    pub(crate) fn publish(&self) -> bento::nix::StorePath {
        let out = bento()
            .args(["publish", "--fleet"])
            .arg(self.sshd.fleet())
            .arg("--chroot")
            .arg(self.sshd.chroot())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "publish: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let (_, m) = bento::server::publish::read_current(&self.sshd.host_dir("alpha")).unwrap();
        m.system
            .expect("a server-built host's manifest names its system")
    }

    pub(crate) fn cache(&self) -> std::path::PathBuf {
        self.sshd.host_dir("alpha").join("cache")
    }

    pub(crate) fn narinfo_path(&self, path: &str) -> std::path::PathBuf {
        self.cache()
            .join(format!("{}.narinfo", narinfo::hash_part(path)))
    }

    pub(crate) fn narinfo(&self, path: &str) -> NarInfo {
        NarInfo::parse(&fs::read_to_string(self.narinfo_path(path)).unwrap()).unwrap()
    }

    pub(crate) fn machine(&self, port: u16) -> Machine<'_> {
        let m = Machine::new(&self.sshd, "alpha", "").via(port);
        m.write_config(&format!("cache_keys = [\"{}\"]\n", self.public));
        m
    }
}

fn nix_store(args: &[&str]) -> std::process::Output {
    Command::new("nix-store")
        .args(args)
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap()
}

pub(crate) fn closure(system: &str) -> Vec<String> {
    let out = nix_store(&["--query", "--requisites", system]);
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Deletes this test's own paths from the one store server and host share here.
pub(crate) fn delete(paths: &[String]) {
    let mut args = vec!["--delete"];
    args.extend(paths.iter().map(String::as_str));
    let mut out = nix_store(&args);
    // The store is shared with the tests running beside this one, and Nix counts what a
    // running process holds as a root for as long as it runs: a path of ours was once
    // "still alive" in a full run. Such a root goes with the process, so try again a few
    // times (bounded: 20 × 250 ms).
    for _ in 0..20 {
        if out.status.success() || !String::from_utf8_lossy(&out.stderr).contains("still alive") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        out = nix_store(&args);
    }
    assert!(
        out.status.success(),
        "nix-store --delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in paths {
        assert!(!Path::new(p).exists(), "{p} is still in the store");
    }
}

/// No Nix evaluation or build was started (every command the agent runs is logged at debug).
pub(crate) fn assert_nothing_evaluated(log: &str) {
    let runs: Vec<&str> = log.lines().filter(|l| l.contains("running")).collect();
    assert!(
        runs.iter().any(|l| l.contains("copy --no-recursive")),
        "no import: {log}"
    );
    for l in &runs {
        for bad in [
            " build ",
            " eval ",
            "nix-build",
            "nix-instantiate",
            " flake ",
        ] {
            assert!(!l.contains(bad), "the host ran {bad:?}: {l}");
        }
    }
}

#[test]
fn a_server_built_host_runs_its_system_without_evaluating_and_fetches_only_changed_nars() {
    let bed = Bed::new(3);
    let system = bed.publish();
    let paths = closure(system.as_str());
    assert_eq!(paths.len(), 4, "{paths:?}");
    delete(&paths);

    let relay = Relay::start(bed.sshd.port);
    let m = bed.machine(relay.port);
    let out = m.update_with(&[("NIX_CONFIG", &no_builds())], &[]);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_nothing_evaluated(&stderr);
    assert!(
        stderr.contains("the store lacks 4 path(s)"),
        "{}",
        text(&out)
    );
    // Said as what happened (issue #24 item 11): substituted, not built.
    assert!(
        stderr.contains(&format!("substituted {system}"))
            && !stderr.contains(&format!("built {system}")),
        "{}",
        text(&out)
    );
    assert_eq!(m.profile_target().as_deref(), Some(system.as_str()));
    assert_eq!(m.activations(), [format!("switch {system}")]);
    let report = m.latest_report();
    assert_eq!(report.outcome, Outcome::Success);
    assert_eq!(report.system_after.as_deref(), Some(system.as_str()));
    for p in &paths {
        assert!(Path::new(p).exists(), "{p} was not imported");
    }
    // The local cache is emptied once its paths are in the store.
    assert!(!m.base.join("state/nix-cache").exists());

    // The no-change floor: one connection reading `current`, writing the heartbeat.
    relay.reset();
    let out = m.update_with(&[("NIX_CONFIG", &no_builds())], &[]);
    assert_eq!(code(&out), EXIT_NOOP, "{}", text(&out));
    let floor = relay.connections()[0];

    // Version 2 changes the toplevel only: its narinfo and NAR cross, no blob does.
    fs::write(
        bed.sshd.fleet().join("hosts/alpha/version.nix"),
        "{ version = \"2\"; }\n",
    )
    .unwrap();
    let system2 = bed.publish();
    assert_ne!(system2, system);
    delete(&[system2.to_string()]);
    let host_dir = bed.sshd.host_dir("alpha");
    let (live, _) = bento::server::publish::read_current(&host_dir).unwrap();
    let manifest_len = fs::metadata(bento::protocol::layout::manifest(&host_dir, &live))
        .unwrap()
        .len();
    let info = bed.narinfo(system2.as_str());
    let changed = info.file_size.unwrap()
        + fs::metadata(bed.narinfo_path(system2.as_str()))
            .unwrap()
            .len();
    relay.reset();
    let out = m.update_with(&[("NIX_CONFIG", &no_builds())], &[]);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_nothing_evaluated(&stderr);
    assert!(
        stderr.contains("the store lacks 1 path(s)"),
        "{}",
        text(&out)
    );
    assert_eq!(m.profile_target().as_deref(), Some(system2.as_str()));
    let conns = relay.connections();
    let budget = floor.down + manifest_len + changed + 8 * 1024;
    assert!(
        conns[0].down <= budget && conns[0].down < floor.down + BLOB as u64,
        "version 2 downloaded {} bytes; floor {}, manifest {manifest_len}, changed NAR + narinfo {changed}",
        conns[0].down,
        floor.down
    );
}

#[test]
fn a_tampered_nar_and_a_foreign_signature_are_refused_before_anything_changes() {
    let bed = Bed::new(1);
    let system = bed.publish();
    let paths = closure(system.as_str());
    // The same paths exported by another cache key: validly signed, by a key the host
    // does not trust.
    let other_keys = bed.secret.parent().unwrap().join("other-key");
    fs::create_dir_all(&other_keys).unwrap();
    let (other_secret, _) = cache_key(&other_keys);
    let other = bed.secret.parent().unwrap().join("other-cache");
    let out = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--to",
        ])
        .arg(format!(
            "file://{}?compression=zstd&secret-key={}",
            other.display(),
            other_secret.display()
        ))
        .arg(system.as_str())
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    delete(&paths);

    let relay = Relay::start(bed.sshd.port);
    let m = bed.machine(relay.port);
    let unchanged = |m: &Machine<'_>| {
        assert_eq!(m.profile_target(), None, "the profile was changed");
        assert!(m.activations().is_empty(), "something was activated");
        for p in &paths {
            assert!(!Path::new(p).exists(), "{p} entered the store");
        }
    };

    // A narinfo signed by another key: refused before any NAR is fetched.
    let blob = paths.iter().find(|p| p.contains("-blob-")).unwrap().clone();
    let ours = bed.narinfo_path(&blob);
    let original = fs::read(&ours).unwrap();
    fs::remove_file(&ours).unwrap();
    fs::copy(
        other.join(format!("{}.narinfo", narinfo::hash_part(&blob))),
        &ours,
    )
    .unwrap();
    let out = m.update_with(&[("NIX_CONFIG", &no_builds())], &["--force"]);
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let error = m.latest_report().error.unwrap_or_default();
    assert!(
        error.contains(&blob) && error.contains("no signature by a trusted cache key"),
        "{error}"
    );
    unchanged(&m);
    fs::remove_file(&ours).unwrap();
    fs::write(&ours, &original).unwrap();

    // A NAR altered on the server (a fresh file: the original is shared with the pool).
    let nar = bed.cache().join(bed.narinfo(system.as_str()).url);
    let mut bytes = fs::read(&nar).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::remove_file(&nar).unwrap();
    fs::write(&nar, &bytes).unwrap();
    let out = m.update_with(&[("NIX_CONFIG", &no_builds())], &["--force"]);
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let error = m.latest_report().error.unwrap_or_default();
    assert!(
        error.contains(system.as_str()) && error.contains("the narinfo says sha256:"),
        "{error}"
    );
    unchanged(&m);
}

#[test]
fn a_rollout_builds_and_exports_a_server_built_host_as_publish_does() {
    let bed = Bed::new(1);
    // No agent runs here: the wave is published, then times out waiting for a report.
    let out = bento()
        .args(["rollout", "--fleet"])
        .arg(bed.sshd.fleet())
        .arg("--chroot")
        .arg(bed.sshd.chroot())
        .args(["--waves", "100%", "--wait-timeout", "1s"])
        .output()
        .unwrap();
    let (_, m) =
        bento::server::publish::read_current(&bed.sshd.host_dir("alpha")).unwrap_or_else(|| {
            panic!(
                "the rollout published nothing: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let system = m
        .system
        .expect("the rollout built the system, as publish does");
    assert!(
        bed.narinfo_path(system.as_str()).is_file(),
        "no narinfo for {system} in cache/"
    );
    assert!(bed.cache().join("nix-cache-info").is_file());
}

/// `bento agent check` on a server-built host: the live build signed by a key in
/// `cache_keys` passes; no `cache_keys`, or another key, is one FAIL line with the fix.
#[test]
fn agent_check_names_a_missing_or_wrong_cache_key() {
    let bed = Bed::new(1);
    bed.publish();
    let m = bed.machine(bed.sshd.port);
    let check = || {
        let out = crate::common::bento_std()
            .args(["agent", "check", "--config"])
            .arg(m.config())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let fails: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("FAIL"))
            .map(str::to_owned)
            .collect();
        (out.status.code(), fails, text)
    };
    let (code, fails, text) = check();
    assert_eq!(code, Some(0), "{text}");
    assert!(fails.is_empty(), "{text}");
    assert!(text.contains("signed by a key in cache_keys"), "{text}");

    let other_keys = bed.secret.parent().unwrap().join("other-key");
    fs::create_dir_all(&other_keys).unwrap();
    let (_, other_public) = cache_key(&other_keys);
    for (cache_keys, needle) in [
        (format!("cache_keys = [\"{other_public}\"]\n"), "signature"),
        (String::new(), "cache_keys is empty"),
    ] {
        m.write_config(&cache_keys);
        let (code, fails, text) = check();
        assert_eq!(code, Some(1), "{text}");
        assert_eq!(fails.len(), 1, "{text}");
        assert!(
            fails[0].contains("cache_keys") && fails[0].contains(needle),
            "{text}"
        );
    }
}
