//! Scenario 8: an update where k of N store paths changed, side by side in one run — a
//! `build_on = "server"` host substituting the server's build through its chroot's `cache/`,
//! and a `build_on = "host"` host evaluating and building the same toy system itself (issue
//! #12). Bytes are counted by a relay (both ways, every connection of the update); host CPU
//! is user + system time of the agent and the children it reaped (Nix included: `wait4`'s
//! rusage). Each toy path holds random bytes, so neither zstd nor SSH compression shrinks
//! the NARs. Server and host share this machine's one store: after each publish the paths
//! the server exported are deleted again, so the prebuilt host really lacks them.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bento::protocol::narinfo::{self, NarInfo};

use crate::machine::{Machine, EXIT_NOOP, EXIT_UPDATED};
use crate::proc::{self, run_ok, Run};
use crate::relay::Relay;
use crate::server::{Scratch, Server, NIX_CONFIG};
use crate::table::{fmt_value, Row, Samples, Unit};
use crate::Config;

const PRE: &str = "pre";
const OWN: &str = "own";

/// The host's flake: `n` paths of `size` random bytes under a toplevel; `version.nix` says
/// the version and how many of the paths (the first `k`) belong to it.
fn flake(tag: &str, n: usize, size: usize) -> String {
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
      blob = i: sh "bench-{tag}-${{toString i}}-${{if i < v.k then v.version else "1"}}"
        "mkdir $out; head -c {size} /dev/urandom > $out/data";
      links = builtins.concatStringsSep "\n"
        (builtins.genList (i: "ln -s ${{blob i}} $out/b${{toString i}}") {n});
    in {{
      nixosConfigurations.HOST.config.system.build.toplevel = sh "nixos-system-{tag}-${{v.version}}" ''
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

fn write_host(server: &Server, host: &str, tag: &str, n: usize, size: usize) {
    let dir = server.fleet().join("hosts").join(host);
    let _ = fs::remove_file(dir.join("configuration.nix"));
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("flake.nix"),
        flake(tag, n, size).replace("HOST", host),
    )
    .unwrap();
    write_version(server, host, 1, 0);
}

fn write_version(server: &Server, host: &str, version: usize, k: usize) {
    let dir = server.fleet().join("hosts").join(host);
    fs::write(
        dir.join("version.nix"),
        format!("{{ version = \"{version}\"; k = {k}; }}\n"),
    )
    .unwrap();
}

fn nix_store(args: &[&str]) -> Run {
    run_ok(
        Command::new("nix-store")
            .args(args)
            .env("NIX_CONFIG", NIX_CONFIG),
        Duration::from_secs(300),
    )
}

/// The live system of `host` and its closure.
fn live(server: &Server, host: &str) -> (String, Vec<String>) {
    let (_, m) = bento::server::publish::read_current(&server.host_dir(host)).expect("published");
    let system = m.system.expect("a system").to_string();
    let out = nix_store(&["--query", "--requisites", &system]);
    let closure = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    (system, closure)
}

/// Deletes `paths` that are in the store (the ones the server just built and exported).
fn delete(paths: &[String]) {
    let present: Vec<&str> = paths
        .iter()
        .map(String::as_str)
        .filter(|p| Path::new(p).exists())
        .collect();
    if !present.is_empty() {
        nix_store(&[&["--delete"], present.as_slice()].concat());
    }
}

fn cache_key(dir: &Path) -> (std::path::PathBuf, String) {
    let secret = run_ok(
        Command::new("nix").args([
            "--extra-experimental-features",
            "nix-command",
            "key",
            "generate-secret",
            "--key-name",
            "bench-prebuilt-1",
        ]),
        Duration::from_secs(30),
    );
    let path = dir.join("cache-key");
    fs::write(&path, &secret.stdout).unwrap();
    let public = proc::run(
        Command::new("nix").args([
            "--extra-experimental-features",
            "nix-command",
            "key",
            "convert-secret-to-public",
        ]),
        &secret.stdout,
        Duration::from_secs(30),
    );
    (
        path,
        String::from_utf8_lossy(&public.stdout).trim().to_owned(),
    )
}

pub fn run(cfg: &Config, rows: &mut Vec<Row>) {
    let (n, size, ks): (usize, usize, &[usize]) = if cfg.smoke {
        (4, 16 * 1024, &[1])
    } else {
        (20, 256 * 1024, &[1, 5])
    };
    let scratch = Scratch::new("prebuilt");
    let server = Server::start(&scratch.join("srv"), &[PRE.to_owned(), OWN.to_owned()]);
    let (secret, public) = cache_key(&scratch.path);
    // Fresh names every run: no path of an earlier run counts.
    let salt = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    write_host(&server, PRE, &format!("p{salt}"), n, size);
    write_host(&server, OWN, &format!("o{salt}"), n, size);
    let toml_path = server.fleet().join("bento.toml");
    let toml = fs::read_to_string(&toml_path)
        .unwrap()
        .replacen(
            "[server]\n",
            &format!("[server]\ncache_key = \"{}\"\n", secret.display()),
            1,
        )
        .replacen(
            &format!("[hosts.{PRE}]\n"),
            &format!("[hosts.{PRE}]\nbuild_on = \"server\"\n"),
            1,
        );
    fs::write(&toml_path, toml).unwrap();
    server.publish();

    let relay = Relay::start(server.port);
    let pre = Machine::new(&server, PRE, &scratch.join("m-pre"), relay.port);
    let own = Machine::new(&server, OWN, &scratch.join("m-own"), relay.port);
    let agent_toml = pre.base.join("agent.toml");
    let mut text = fs::read_to_string(&agent_toml).unwrap();
    text.push_str(&format!("cache_keys = [\"{public}\"]\n"));
    fs::write(&agent_toml, text).unwrap();
    // First installs: the prebuilt host substitutes everything, the other builds everything.
    delete(&live(&server, PRE).1);
    pre.update_expect(EXIT_UPDATED);
    own.update_expect(EXIT_UPDATED);
    relay.reset();
    pre.update_expect(EXIT_NOOP);
    let floor = relay.connections().iter().map(|c| c.total()).sum::<u64>();

    let mut version = 1;
    for &k in ks {
        let s = format!(
            "8 prebuilt ({k} of {} paths changed, {} each)",
            n + 1,
            fmt_value(size as f64, Unit::Bytes)
        );
        let (mut pre_bytes, mut own_bytes) = (Samples::default(), Samples::default());
        let (mut pre_cpu, mut own_cpu) = (Samples::default(), Samples::default());
        let mut ratios = Vec::new();
        for _ in 0..cfg.reps {
            version += 1;
            write_version(&server, PRE, version, k);
            write_version(&server, OWN, version, k);
            let before = live(&server, PRE).1;
            server.publish();
            let (system, closure) = live(&server, PRE);
            let changed: Vec<String> = closure
                .iter()
                .filter(|p| !before.contains(p))
                .cloned()
                .collect();
            assert_eq!(changed.len(), k + 1, "{system}: {changed:?}");
            // What the update must move at least: the changed paths' NARs and narinfos.
            let cache = server.host_dir(PRE).join("cache");
            let mut wanted = 0u64;
            for p in &changed {
                let name = cache.join(format!("{}.narinfo", narinfo::hash_part(p)));
                let text = fs::read_to_string(&name).unwrap();
                let info = NarInfo::parse(&text).unwrap();
                wanted += text.len() as u64 + info.file_size.unwrap_or(0);
            }
            delete(&changed);

            relay.reset();
            let r = pre.update_expect(EXIT_UPDATED);
            let conns = relay.connections();
            let update = conns.first().map_or(0, |c| c.total());
            let all: u64 = conns.iter().map(|c| c.total()).sum();
            pre_bytes.push(all as f64);
            pre_cpu.push(r.cpu.as_secs_f64());
            ratios.push(update as f64 / (wanted + floor) as f64);

            relay.reset();
            let r = own.update_expect(EXIT_UPDATED);
            own_bytes.push(relay.connections().iter().map(|c| c.total()).sum::<u64>() as f64);
            own_cpu.push(r.cpu.as_secs_f64());
        }
        ratios.sort_by(f64::total_cmp);
        let ratio = ratios[ratios.len() / 2];
        rows.push(
            Row::new(
                &s,
                "bytes, all connections (prebuilt / host builds)",
                Unit::Bytes,
            )
            .bento(pre_bytes)
            .baseline(own_bytes),
        );
        rows.push(
            Row::new(
                &s,
                "host CPU, user + sys (prebuilt / host builds)",
                Unit::Secs,
            )
            .bento(pre_cpu)
            .baseline(own_cpu),
        );
        rows.push(
            Row::new(
                &s,
                "update connection vs changed NARs + narinfos + no-change floor",
                Unit::Count,
            )
            .goal(format!("≤ 1.05 ×; {ratio:.3}×"), ratio <= 1.05),
        );
    }
}
