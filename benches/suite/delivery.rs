//! Scenario 7: server disk for `build_on = "server"` binary caches (issue #12). N toy systems
//! (100; 5 with --smoke), each closure ~90 % shared: one common 9 MiB path plus the host's
//! own 1 MiB path (random bytes: zstd cannot shrink them, so NAR bytes are honest). Their
//! closures are exported once into the pool and hard-linked into each host's `cache/`, as
//! `bento publish` does (`server::delivery::cache`); the chroot's disk (`du`, each inode once)
//! is compared with the unique NAR bytes, and with one cache copy per host (the baseline).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bento::nix::{Nix, StorePath};
use bento::protocol::layout::Chroot;
use bento::protocol::HostName;
use bento::server::chroot::Ownership;
use bento::server::delivery::cache;
use bento::server::store::ChrootStore;

use crate::proc::{du, run_ok};
use crate::server::Scratch;
use crate::table::{fmt_value, Row, Samples, Unit};
use crate::Config;

fn expr(hosts: usize, shared_kib: usize, own_kib: usize, salt: &str) -> String {
    format!(
        r#"let
  sh = name: script: derivation {{ inherit name; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" script ]; PATH = "/usr/bin:/bin"; salt = "{salt}"; }};
  shared = sh "bench-shared" "mkdir $out; head -c {shared} /dev/urandom > $out/blob";
  host = i: sh "nixos-system-bench-${{toString i}}" ''
    mkdir $out; ln -s ${{shared}} $out/shared; head -c {own} /dev/urandom > $out/blob
  '';
in builtins.genList host {hosts}"#,
        shared = shared_kib * 1024,
        own = own_kib * 1024,
    )
}

pub fn run(cfg: &Config, rows: &mut Vec<Row>) {
    let (hosts, shared_kib, own_kib) = if cfg.smoke {
        (5, 90, 10)
    } else {
        (100, 9 * 1024, 1024)
    };
    let scratch = Scratch::new("delivery");
    let dir = &scratch.path;
    let nix_config = "sandbox = false\nexperimental-features = nix-command flakes\nbuild-users-group =\nsubstituters =\nflake-registry =";
    // A fresh salt: every run exports new paths (nothing left from an earlier run counts).
    let salt = format!("{:?}", std::time::SystemTime::now());
    let build = run_ok(
        Command::new("nix-build")
            .args([
                "--no-out-link",
                "-E",
                &expr(hosts, shared_kib, own_kib, &salt),
            ])
            .env("NIX_CONFIG", nix_config),
        Duration::from_secs(1800),
    );
    let stdout = String::from_utf8_lossy(&build.stdout).into_owned();
    let systems: Vec<StorePath> = stdout
        .lines()
        .map(|l| StorePath::new(l.trim()).expect("a store path"))
        .collect();
    assert_eq!(systems.len(), hosts, "nix-build printed {stdout:?}");

    let key_out = run_ok(
        Command::new("nix").args([
            "--extra-experimental-features",
            "nix-command",
            "key",
            "generate-secret",
            "--key-name",
            "bench-1",
        ]),
        Duration::from_secs(30),
    );
    let key_path = dir.join("cache-key");
    fs::write(&key_path, &key_out.stdout).unwrap();
    let key = cache::CacheKey::load(&key_path).unwrap();
    let chroot = Chroot::new(dir.join("chroot"));
    fs::create_dir_all(chroot.state_dir()).unwrap();
    let nix = Nix::default().with_env("NIX_CONFIG", nix_config);

    let t = Instant::now();
    cache::export(&nix, &chroot, &key, &systems).expect("export");
    let export_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut per_host_nar = 0u64;
    let store = ChrootStore::new(chroot.clone(), Ownership::Leave);
    for (i, system) in systems.iter().enumerate() {
        let host = HostName::new(&format!("h{i}")).unwrap();
        let host_dir = chroot.host_dir(&host);
        fs::create_dir_all(&host_dir).unwrap();
        cache::link_host(&store, &chroot, &host, &key, system).expect("link");
        per_host_nar += nar_bytes(&host_dir.join("cache")).values().sum::<u64>();
    }
    let link_s = t.elapsed().as_secs_f64();
    let unique: u64 = nar_bytes(&cache::pool_dir(&chroot)).values().sum();
    // du counts each inode once: hard-linked NARs and narinfos cost one copy.
    let disk = du(&chroot.root, false);
    let ratio = disk as f64 / unique as f64;
    let s = format!("7 delivery ({hosts} hosts, 90 % shared)");
    rows.push(
        Row::new(&s, "server disk (bento) / one cache per host", Unit::Bytes)
            .bento(Samples::one(disk as f64))
            .baseline(Samples::one(per_host_nar as f64))
            .goal(
                format!(
                    "≤ 1.1 × unique NAR bytes ({}); {ratio:.3}×",
                    fmt_value(unique as f64, Unit::Bytes)
                ),
                ratio <= 1.1,
            ),
    );
    rows.push(Row::new(&s, "export (nix copy, zstd)", Unit::Secs).bento(Samples::one(export_s)));
    rows.push(Row::new(&s, "link every host's cache", Unit::Secs).bento(Samples::one(link_s)));
}

/// NAR files under `cache/nar/` by name, with their sizes.
fn nar_bytes(cache: &Path) -> BTreeMap<String, u64> {
    let Ok(entries) = fs::read_dir(cache.join("nar")) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect()
}
