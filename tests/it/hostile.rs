//! Property tests ("fuzzing" with proptest) of everything a host reads from an untrusted
//! server: the manifest parser never panics, and no manifest it accepts can make the agent
//! write outside the directory it stages into.

use std::path::{Component, Path};

use bento::protocol::manifest::{Digest, Manifest, RelPath, TargetPath};
use bento::protocol::HostName;
use proptest::prelude::*;

fn host() -> HostName {
    HostName::new("alpha").unwrap()
}

const GOOD: &str = r#"{"format":1,"host":"alpha","created":"2026-11-25T12:00:00Z","source_commit":null,"build":"flake","system":null,"config":[{"path":"d","kind":"directory"},{"path":"d/f.nix","kind":"file","size":1,"sha256":"2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881","executable":false},{"path":"flake.nix","kind":"file","size":1,"sha256":"2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881","executable":true}],"files":[{"path":"etc/k","target":"/etc/k","size":1,"sha256":"2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881","owner":"root","group":"root","mode":"0600"}]}
"#;

/// Path-ish strings: segments drawn from safe names and every classic trick.
fn pathish() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just(String::new()),
        Just("/".to_owned()),
        Just("a\0b".to_owned()),
        "[a-z.~-]{1,6}",
        any::<String>(),
    ];
    prop::collection::vec(seg, 1..6).prop_map(|v| v.join("/"))
}

fn stays_inside(p: &str) -> bool {
    Path::new(p)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
}

/// The staged tree and everything in it must be inside `root`.
fn all_inside(root: &Path) -> bool {
    let canon = std::fs::canonicalize(root).unwrap();
    let mut stack = vec![canon.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() || !p.starts_with(&canon) {
                return false;
            }
            if meta.is_dir() {
                stack.push(p);
            }
        }
    }
    true
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Manifest::parse_untrusted(&bytes, &Digest::of(&bytes), &host());
    }

    #[test]
    fn mutated_manifests_never_panic_and_stay_safe(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8)
    ) {
        let mut bytes = GOOD.as_bytes().to_vec();
        for (at, byte, op) in edits {
            let len = bytes.len();
            let i = at.index(len.max(1));
            match op {
                0 if len > 0 => bytes[i.min(len - 1)] = byte,
                1 => bytes.insert(i.min(len), byte),
                _ if len > 0 => { bytes.remove(i.min(len - 1)); }
                _ => {}
            }
        }
        if let Ok(m) = Manifest::parse_untrusted(&bytes, &Digest::of(&bytes), &host()) {
            for e in &m.config {
                prop_assert!(stays_inside(e.path().as_str()), "{:?}", e.path());
            }
            for f in &m.files {
                prop_assert!(stays_inside(f.target.as_str().trim_start_matches('/')), "{:?}", f.target);
            }
        }
    }

    #[test]
    fn relative_paths_never_escape(s in pathish()) {
        if let Ok(p) = RelPath::new(&s) {
            prop_assert!(stays_inside(p.as_str()), "{s:?} accepted");
        }
        if let Ok(t) = TargetPath::new(&format!("/{s}")) {
            prop_assert!(stays_inside(t.as_str().trim_start_matches('/')), "{s:?} accepted as target");
        }
    }

    #[test]
    fn accepted_manifests_stage_only_inside_their_directory(paths in prop::collection::vec(pathish(), 1..6)) {
        // Build a manifest naming these paths (as directories and files), parse it as a host
        // would, and stage whatever it accepts.
        let obj = Digest::of(b"x");
        let entries: Vec<String> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let p = serde_json::to_string(p).unwrap();
                if i % 2 == 0 {
                    format!(r#"{{"path":{p},"kind":"directory"}}"#)
                } else {
                    format!(r#"{{"path":{p},"kind":"file","size":1,"sha256":"{obj}","executable":false}}"#)
                }
            })
            .collect();
        let text = format!(
            r#"{{"format":1,"host":"alpha","created":"2026-11-25T12:00:00Z","source_commit":null,"build":"flake","system":null,"config":[{}],"files":[]}}"#,
            entries.join(",")
        );
        if let Ok(m) = Manifest::parse_untrusted(text.as_bytes(), &Digest::of(text.as_bytes()), &host()) {
            let t = tempfile::tempdir().unwrap();
            let objects = t.path().join("objects");
            let config = t.path().join("config");
            std::fs::create_dir_all(&objects).unwrap();
            std::fs::create_dir_all(&config).unwrap();
            std::fs::write(objects.join(obj.to_hex()), b"x").unwrap();
            let digest = Digest::of(text.as_bytes());
            if bento::agent::files::stage_config(&m, &digest, &objects, &config).is_ok() {
                prop_assert!(all_inside(&config.join(digest.to_hex())));
            }
            prop_assert!(std::fs::read_dir(t.path()).unwrap().count() == 2, "nothing written beside the state dirs");
        }
    }
}

#[test]
fn oversized_entries_are_refused_before_download() {
    let big = GOOD.replacen(
        "\"size\":1,",
        &format!(
            "\"size\":{},",
            bento::protocol::manifest::MAX_OBJECT_BYTES + 1
        ),
        1,
    );
    let err = Manifest::parse_untrusted(big.as_bytes(), &Digest::of(big.as_bytes()), &host())
        .unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    let huge = vec![b' '; bento::protocol::manifest::MAX_MANIFEST_BYTES as usize + 1];
    assert!(Manifest::parse_untrusted(&huge, &Digest::of(&huge), &host()).is_err());
}

/// Every regular file under `dir` whose bytes contain `marker`.
fn files_containing(dir: &Path, marker: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            found.extend(files_containing(&path, marker));
        } else if meta.is_file() {
            let bytes = std::fs::read(&path).unwrap_or_default();
            if bytes.windows(marker.len()).any(|w| w == marker) {
                found.push(path);
            }
        }
    }
    found
}

/// A fleet-repo contributor flips a directory of a host's tree with a symlink to a
/// root-only directory outside the repo, over and over, while publish runs: no publish may
/// ever read through the link (the marker never reaches any object, the pool or a chroot).
#[test]
fn swapping_a_directory_for_a_link_during_publish_never_reads_outside_the_repo() {
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use crate::common::{bento_std, unique_prefix, Accounts, ScratchDir};

    let scratch = ScratchDir::new();
    let prefix = unique_prefix();
    let _accounts = Accounts::create(&prefix, &["victim"]);
    let fleet = scratch.join("fleet");
    let chroot = scratch.join("chroot");
    let host = fleet.join("hosts/victim");
    std::fs::create_dir_all(host.join("sub")).unwrap();
    std::fs::write(
        fleet.join("bento.toml"),
        format!("[server]\naccount_prefix = \"{prefix}\"\n\n[hosts.victim]\n"),
    )
    .unwrap();
    std::fs::write(host.join("configuration.nix"), "{ ... }: { }\n").unwrap();
    std::fs::write(host.join("sub/data.txt"), "harmless\n").unwrap();
    // The root-only directory outside the repo, with a file of the same name.
    let secret = scratch.join("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let marker = b"MARKER-outside-the-repo-7f3a9c";
    std::fs::write(secret.join("data.txt"), marker).unwrap();
    symlink(&secret, host.join("swap")).unwrap();

    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, host) = (stop.clone(), host.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Atomically: `sub` becomes the link and `swap` the directory, and back.
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    host.join("sub"),
                    rustix::fs::CWD,
                    host.join("swap"),
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .unwrap();
                flips += 1;
                std::thread::yield_now();
            }
            flips
        })
    };

    let start = Instant::now();
    let (mut runs, mut published) = (0, 0);
    let mut leaked = Vec::new();
    while runs < 200 && start.elapsed() < Duration::from_secs(60) {
        let out = bento_std()
            .arg("--fleet")
            .arg(&fleet)
            .args(["publish", "--json", "--chroot"])
            .arg(&chroot)
            .output()
            .unwrap();
        runs += 1;
        if String::from_utf8_lossy(&out.stdout).contains("\"published\"") {
            published += 1;
        }
        leaked = files_containing(&chroot, marker);
        if !leaked.is_empty() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flips = swapper.join().unwrap();
    assert!(
        leaked.is_empty(),
        "run {runs}: the file outside the repo was published: {leaked:?}"
    );
    assert!(flips > 0 && runs > 10, "{runs} runs, {flips} flips");
    eprintln!("swap race: {runs} publishes ({published} published), {flips} flips, nothing leaked");
}

/// Issue #14 item 6: a root-owned symlink on the host, leading to a directory another user
/// owns, let a `files` entry be written there (the owner check looked at the link, not at
/// where it leads). Needs root: the directory must belong to someone else.
#[test]
fn a_linked_parent_directory_owned_by_another_user_is_refused() {
    use std::os::unix::fs::{chown, symlink};
    if !crate::common::is_root() {
        eprintln!("skipped: needs root (a directory owned by another user)");
        return;
    }
    let t = crate::common::ScratchDir::new();
    let (objects, root) = (t.join("objects"), t.join("root"));
    let theirs_inside = root.join("home/bob");
    let theirs_outside = t.join("elsewhere/bob");
    for d in [&objects, &root.join("etc"), &theirs_inside, &theirs_outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    for d in [&theirs_inside, &theirs_outside] {
        chown(d, Some(65534), Some(65534)).unwrap();
    }
    // Root-owned links (made by root), as an admin or a package might leave them.
    symlink(&theirs_inside, root.join("etc/inside")).unwrap();
    symlink(&theirs_outside, root.join("etc/outside")).unwrap();
    let content = b"secret\n";
    std::fs::write(objects.join(Digest::of(content).to_hex()), content).unwrap();
    let entry = |target: &str| bento::protocol::manifest::FileEntry {
        path: RelPath::new(target.trim_start_matches('/')).unwrap(),
        target: TargetPath::new(target).unwrap(),
        size: content.len() as u64,
        sha256: Digest::of(content),
        owner: "root".into(),
        group: "root".into(),
        mode: bento::protocol::manifest::Mode(0o600),
        encrypted: None,
    };
    let cases = [
        ("/home/bob/key", "not owned by root"),
        ("/etc/inside/key", "not owned by root"),
        ("/etc/inside/sub/key", "not owned by root"),
        ("/etc/outside/key", "outside the files root"),
    ];
    for (target, why) in cases {
        let err = bento::agent::files::install_files(
            &[entry(target)],
            &objects,
            &root,
            &[],
            Path::new("/nonexistent"),
        )
        .expect_err(target)
        .to_string();
        assert!(err.contains(target) && err.contains(why), "{target}: {err}");
    }
    for d in [&theirs_inside, &theirs_outside] {
        assert_eq!(
            std::fs::read_dir(d).unwrap().count(),
            0,
            "nothing written into {}",
            d.display()
        );
    }
}

/// Issue #14 item 7: one manifest stamped in the future (a publishing machine whose clock
/// ran ahead) made the host refuse every later version as a replay, `--force` or not.
/// Versions are ordered by the signed per-host `serial` now; a replay is still refused.
#[test]
fn a_version_stamped_in_the_future_does_not_lock_the_host_out() {
    use crate::agent::{code, fleet, text, write_version, Machine, EXIT_FAILED, EXIT_UPDATED};
    use crate::signing::{keygen, live, set_signing_key};
    let sshd = crate::common::sshd::Sshd::start(&["alpha"]);
    let key = sshd.dir.join("signing/key");
    let public = keygen(&key);
    set_signing_key(&sshd, &key);
    fleet(&sshd);
    let m = Machine::new(&sshd, "alpha", &format!("trusted_keys = [\"{public}\"]\n"));
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));

    // Version 2, published by a machine whose clock was decades ahead: the same manifest
    // restamped and signed again (what that publish would have written).
    write_version(&sshd, "2");
    sshd.publish();
    let dir = sshd.host_dir("alpha");
    let v2 = live(&sshd, "alpha");
    let mut m2 =
        Manifest::parse(&std::fs::read(bento::protocol::layout::manifest(&dir, &v2)).unwrap())
            .unwrap();
    m2.created = "2080-01-01T00:00:00.000Z".parse().unwrap();
    let bytes = m2.to_bytes();
    let future = Digest::of(&bytes);
    let signer = bento::protocol::signing::Signer::load(&key).unwrap();
    std::fs::write(bento::protocol::layout::manifest(&dir, &future), &bytes).unwrap();
    std::fs::write(
        bento::protocol::layout::signature(&dir, &future),
        signer.sign(&bytes).unwrap(),
    )
    .unwrap();
    std::fs::write(
        bento::protocol::layout::current(&dir),
        bento::protocol::layout::current_text(&future),
    )
    .unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));

    // The next publish, from a machine with the right time: it warns that its clock is
    // behind the live version, and the host accepts it.
    write_version(&sshd, "3");
    let out = crate::common::bento()
        .args(["publish", "--no-eval", "--json", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warning = json[0]["warnings"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        warning.contains("clock") && warning.contains("behind"),
        "{json}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("behind"),
        "warned on stderr too"
    );
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(m.profile_target().unwrap().contains("-alpha-3"));

    // A replay of an older serial (whatever its time says) is still refused.
    for old in [future, v2] {
        std::fs::write(
            bento::protocol::layout::current(&dir),
            bento::protocol::layout::current_text(&old),
        )
        .unwrap();
        let out = m.update();
        assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
        let error = m.latest_report().error.unwrap();
        assert!(
            error.contains("replayed") && error.contains("serial"),
            "{error}"
        );
    }
    assert!(
        m.profile_target().unwrap().contains("-alpha-3"),
        "still on 3"
    );
}

/// Issue #14 item 4: with the server's session stopped mid-download (packets silently
/// dropped), the agent hung forever holding its lock. Every request is bounded by
/// `stall_timeout` now: the run ends, the lock is free, and the report saying the server
/// stalled is spooled and delivered by the next run.
#[test]
fn a_server_that_stops_answering_mid_download_does_not_wedge_the_agent() {
    use crate::agent::{code, fleet, text, Machine, EXIT_UPDATED};
    use crate::common::relay::{Cut, Dir, Relay};
    let sshd = crate::common::sshd::Sshd::start(&["alpha"]);
    fleet(&sshd);
    // 4 MiB that do not compress, so the download is long enough to stop in the middle.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let big: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(
        sshd.fleet()
            .join("hosts/alpha/files/alpha/etc/bento-it/big"),
        &big,
    )
    .unwrap();
    sshd.publish();
    let relay = Relay::start(sshd.port);
    let m = Machine::new(&sshd, "alpha", "").via(relay.port);
    m.write_config("stall_timeout = \"3s\"\n");
    relay.stall_after(Cut {
        conn: 0,
        dir: Dir::Down,
        bytes: 1 << 20,
    });

    let started = std::time::Instant::now();
    let out = m.update(); // panics if the run does not end within 120 s
    assert!(relay.cut_fired(), "the stall happened: {}", text(&out));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(90),
        "{:?}",
        started.elapsed()
    );
    assert_ne!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server stalled"), "{}", text(&out));
    let spooled = m.spooled();
    assert!(
        spooled.iter().any(|r| r.contains("server stalled")),
        "{spooled:?}"
    );

    // The server answers again: the lock is free, the next run resumes and delivers the
    // report of the stalled run.
    relay.stall(false);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let delivered = m.delivered();
    assert!(
        delivered.iter().any(|r| r.contains("server stalled")),
        "{delivered:?}"
    );
    assert_eq!(
        std::fs::read(m.base.join("root/etc/bento-it/big")).unwrap(),
        big
    );
}
