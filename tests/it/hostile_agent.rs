//! Hostile testing, round three, the agent's side (issue #23): each test re-does an attack
//! over the real parts (sshd, Nix, the page on loopback) and asserts the defended outcome.
//! docs/security.md's attack table names these tests.

use std::time::{Duration, Instant};

use crate::agent::{code, fleet, text, Machine, EXIT_FAILED, EXIT_UPDATED};
use crate::common::relay::{Cut, Dir, Relay};
use crate::common::sshd::Sshd;

/// `n` bytes that do not compress (xorshift), the same for every call.
pub(crate) fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Issue #23 note 17: on a link that silently drops everything, ssh's own keep-alive may end
/// the connection before `stall_timeout` does; the run then ended "interrupted: read/flush
/// task failed" and no report said the server had stalled. With `stall_timeout = 12s` ssh
/// gives up first (keep-alives every 2 s, four unanswered), and the run is still reported,
/// spooled and later delivered as a stall.
#[test]
fn a_stall_ended_by_ssh_keepalive_is_reported_as_a_stall() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    std::fs::write(
        sshd.fleet()
            .join("hosts/alpha/files/alpha/etc/bento-it/big"),
        noise(4 << 20),
    )
    .unwrap();
    sshd.publish();
    let relay = Relay::start(sshd.port);
    let m = Machine::new(&sshd, "alpha", "").via(relay.port);
    m.write_config("stall_timeout = \"12s\"\n");
    relay.stall_after(Cut {
        conn: 0,
        dir: Dir::Down,
        bytes: 1 << 20,
    });

    let started = Instant::now();
    let out = m.update();
    assert!(relay.cut_fired(), "the stall happened: {}", text(&out));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server stalled") && stderr.contains("keep-alive"),
        "ssh's keep-alive ended it, and it is called a stall: {}",
        text(&out)
    );
    let spooled = m.spooled();
    assert!(
        spooled.iter().any(|r| r.contains("server stalled")),
        "{spooled:?}"
    );

    relay.stall(false);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let delivered = m.delivered();
    assert!(
        delivered.iter().any(|r| r.contains("server stalled")),
        "{delivered:?}"
    );
}

/// Bytes the relay carried from the server since its last `reset`.
fn down_bytes(relay: &Relay) -> u64 {
    relay.connections().iter().map(|t| t.down).sum()
}

/// Points the host's `current` at a "manifest" of `bytes` (content-addressed, as a
/// compromised server can write), with `sig` as its signature when given.
fn serve_manifest(
    sshd: &Sshd,
    bytes: &[u8],
    sig: Option<&[u8]>,
) -> bento::protocol::manifest::Digest {
    use bento::protocol::layout;
    let dir = sshd.host_dir("alpha");
    let digest = bento::protocol::manifest::Digest::of(bytes);
    std::fs::write(layout::manifest(&dir, &digest), bytes).unwrap();
    if let Some(sig) = sig {
        std::fs::write(layout::signature(&dir, &digest), sig).unwrap();
    }
    std::fs::write(layout::current(&dir), layout::current_text(&digest)).unwrap();
    digest
}

/// Issue #23 item 11: with `trusted_keys` set, a 60 MiB unsigned "manifest" was downloaded
/// (36 MB before the test gave up) before its signature was looked at. The signature is read
/// first now: an unsigned manifest, one signed by an untrusted key and one over the size
/// limit (even signed by the fleet's key) are refused having moved a few kilobytes.
#[test]
fn an_unsigned_or_oversized_manifest_is_refused_before_it_is_downloaded() {
    use crate::signing::{keygen, set_signing_key};
    let sshd = Sshd::start(&["alpha"]);
    let key = sshd.dir.join("signing/key");
    let public = keygen(&key);
    set_signing_key(&sshd, &key);
    fleet(&sshd);
    let relay = Relay::start(sshd.port);
    let m = Machine::new(&sshd, "alpha", "").via(relay.port);
    m.write_config(&format!("trusted_keys = [\"{public}\"]\n"));
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let applied = m.profile_target().unwrap();

    let big = noise(60 << 20);
    let other = bento::protocol::signing::Signer::load(&{
        let k = sshd.dir.join("signing/other");
        keygen(&k);
        k
    })
    .unwrap();
    let foreign = other.sign(&big).unwrap();
    // Over the 64 MiB limit, and signed by the fleet's own key: a stat refuses it.
    let mut huge = vec![b' '; (64 << 20) + 1];
    huge[..4].copy_from_slice(b"{  }");
    let fleet_signed = bento::protocol::signing::Signer::load(&key)
        .unwrap()
        .sign(&huge)
        .unwrap();
    for (what, bytes, sig, says) in [
        ("unsigned", &big, None, "not signed"),
        (
            "signed by an untrusted key",
            &big,
            Some(foreign.as_bytes()),
            "no trusted key",
        ),
        (
            "oversized",
            &huge,
            Some(fleet_signed.as_bytes()),
            "larger than",
        ),
    ] {
        serve_manifest(&sshd, bytes, sig);
        relay.reset();
        // `--force`: two cases share a digest, which the first refusal put in back-off.
        let out = m.update_with(&[], &["--force"]);
        assert_eq!(code(&out), EXIT_FAILED, "{what}: {}", text(&out));
        let error = m.latest_report().error.unwrap_or_default();
        assert!(error.contains(says), "{what}: {error}");
        let moved = down_bytes(&relay);
        assert!(
            moved < 256 << 10,
            "{what}: {moved} bytes came from the server for a refused manifest"
        );
        assert_eq!(
            m.profile_target().unwrap(),
            applied,
            "{what}: nothing applied"
        );
    }
}

/// Issue #23 item 7: a machine whose state directory was wiped accepted any older signed
/// version a compromised server kept. `min_serial` in agent.toml (the NixOS module's
/// `minSerial`, set when the image is built) is a floor the state cannot lower: the old
/// version is refused after the wipe, where without it the same machine took it.
#[test]
fn a_wiped_state_dir_cannot_lower_the_min_serial() {
    use crate::agent::write_version;
    use crate::signing::{keygen, live, set_signing_key};
    use bento::protocol::layout;
    let sshd = Sshd::start(&["alpha"]);
    let key = sshd.dir.join("signing/key");
    let public = keygen(&key);
    set_signing_key(&sshd, &key);
    fleet(&sshd);
    let v1 = live(&sshd, "alpha");
    write_version(&sshd, "2");
    sshd.publish();
    let v2 = live(&sshd, "alpha");
    let dir = sshd.host_dir("alpha");
    let serial = |d| {
        bento::protocol::manifest::Manifest::parse(
            &std::fs::read(layout::manifest(&dir, &d)).unwrap(),
        )
        .unwrap()
        .serial
    };
    assert!(serial(v1) < serial(v2));
    let floor = serial(v2);
    let keys = format!("trusted_keys = [\"{public}\"]\n");
    let m = Machine::new(&sshd, "alpha", &format!("{keys}min_serial = {floor}\n"));
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(m.profile_target().unwrap().contains("-alpha-2"));

    // The state is wiped, and the server (compromised) serves the older signed version.
    std::fs::remove_dir_all(m.base.join("state")).unwrap();
    std::fs::write(layout::current(&dir), layout::current_text(&v1)).unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let error = m.latest_report().error.unwrap_or_default();
    assert!(error.contains("min_serial"), "{error}");
    assert!(
        m.profile_target().unwrap().contains("-alpha-2"),
        "still on 2"
    );

    // What the floor prevents: the same wiped machine without it takes the old version.
    std::fs::remove_dir_all(m.base.join("state")).unwrap();
    m.write_config(&keys);
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(m.profile_target().unwrap().contains("-alpha-1"));
}

/// A zstd frame of RLE blocks: `blocks` × 128 KiB of zeros, from 4 bytes per block.
fn zstd_bomb(blocks: usize) -> Vec<u8> {
    // Magic, no content size, a 128 KiB window.
    let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x38];
    for i in 0..blocks {
        let last = u32::from(i + 1 == blocks);
        let header = (128 * 1024) << 3 | 1 << 1 | last;
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.push(0);
    }
    out
}

/// Serves `file` as the NAR of `path` in the bed's cache: a new URL, `FileHash` and
/// `FileSize` (the fields outside the signature, which a server can edit), the signed
/// fields untouched. `size` overrides `FileSize` (the file may be sparse).
fn replace_nar(bed: &crate::substitute::Bed, path: &str, file: &std::path::Path, size: u64) {
    use sha2::Digest as _;
    let bytes_hash: [u8; 32] = if size <= 64 << 20 {
        sha2::Sha256::digest(std::fs::read(file).unwrap()).into()
    } else {
        [7; 32]
    };
    let hash = bento::protocol::narinfo::nix32(&bytes_hash);
    let ext = file
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let url = format!("nar/{hash}.nar{ext}");
    std::fs::rename(file, bed.cache().join(&url)).unwrap();
    let narinfo = bed.narinfo_path(path);
    let text: String = std::fs::read_to_string(&narinfo)
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("URL: ") {
                format!("URL: {url}\n")
            } else if l.starts_with("FileHash: ") {
                format!("FileHash: sha256:{hash}\n")
            } else if l.starts_with("FileSize: ") {
                format!("FileSize: {size}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    // A fresh file: the original is shared with the server's pool.
    std::fs::remove_file(&narinfo).unwrap();
    std::fs::write(&narinfo, text).unwrap();
}

/// Issue #23 item 5: a 96 KiB zstd NAR that expands to 3 GiB, its unsigned `FileSize` and
/// `FileHash` edited to match, passed bento's checks, and `nix copy` wrote gigabytes into the
/// store before refusing it (and left the invalid path there). The agent decompresses it
/// itself now, stops one byte past the signed `NarSize`, and refuses it before Nix is run:
/// nothing of the closure enters the store.
#[test]
fn a_decompression_bomb_in_the_cache_is_refused_before_nix_sees_it() {
    use crate::substitute::{closure, delete, no_builds, Bed};
    let bed = Bed::new(1);
    let system = bed.publish();
    let paths = closure(system.as_str());
    delete(&paths);
    let blob = paths.iter().find(|p| p.contains("-blob-")).unwrap().clone();
    let bomb = zstd_bomb(24 * 1024);
    assert!(bomb.len() < 100 * 1024);
    let file = bed.sshd.dir.join("bomb.zst");
    std::fs::write(&file, &bomb).unwrap();
    replace_nar(&bed, &blob, &file, bomb.len() as u64);

    let relay = Relay::start(bed.sshd.port);
    let m = bed.machine(relay.port);
    let started = Instant::now();
    let out = m.update_with(&[("NIX_CONFIG", &no_builds())], &[]);
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let error = m.latest_report().error.unwrap_or_default();
    assert!(
        error.contains(&blob) && error.contains("larger than the signed NarSize"),
        "{error}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("copy --no-recursive"),
        "Nix was never handed the bomb: {}",
        text(&out)
    );
    for p in &paths {
        assert!(!std::path::Path::new(p).exists(), "{p} entered the store");
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    let moved = down_bytes(&relay);
    assert!(moved < 1 << 20, "{moved} bytes");
    assert_eq!(m.profile_target(), None, "nothing applied");
}

/// Issue #23 item 6: a narinfo claiming a 2 GiB `FileSize` for a NAR of a few kilobytes made
/// the host download 2 GiB before refusing it. A `FileSize` beyond what compressing the
/// signed `NarSize` can produce is refused before any NAR is fetched.
#[test]
fn a_file_size_beyond_what_nar_size_allows_is_refused_before_download() {
    use crate::substitute::{closure, delete, no_builds, Bed};
    let bed = Bed::new(1);
    let system = bed.publish();
    let paths = closure(system.as_str());
    delete(&paths);
    let nar_size = bed.narinfo(system.as_str()).nar_size;
    assert!(nar_size < 64 << 10, "a small NAR: {nar_size}");
    let file = bed.sshd.dir.join("huge.zst");
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(2 << 30).unwrap();
    replace_nar(&bed, system.as_str(), &file, 2 << 30);

    let relay = Relay::start(bed.sshd.port);
    let m = bed.machine(relay.port);
    let out = m.update_with(&[("NIX_CONFIG", &no_builds())], &[]);
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let error = m.latest_report().error.unwrap_or_default();
    assert!(
        error.contains(system.as_str())
            && error.contains("FileSize 2147483648")
            && error.contains(&format!("NarSize {nar_size}")),
        "{error}"
    );
    let moved = down_bytes(&relay);
    assert!(moved < 1 << 20, "{moved} bytes");
    for p in &paths {
        assert!(!std::path::Path::new(p).exists(), "{p} entered the store");
    }
}

/// Issue #23 item 6, the second half: the missing NARs are checked against the free space of
/// the state directory before the first byte is fetched; a download that cannot fit is
/// refused, saying how much it needs, instead of filling the disk.
#[test]
fn a_download_that_cannot_fit_the_state_dir_is_refused_before_it_starts() {
    use crate::common::faults::Tmpfs;
    use crate::substitute::{closure, delete, no_builds, Bed};
    // 12 NARs of 64 KiB of noise, for a state directory with 512 KiB.
    let bed = Bed::new(12);
    let system = bed.publish();
    let paths = closure(system.as_str());
    delete(&paths);
    let relay = Relay::start(bed.sshd.port);
    let m = bed.machine(relay.port);
    let state = m.base.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let _disk = Tmpfs::mount(&state, 512 << 10);
    let out = m.update_with(&[("NIX_CONFIG", &no_builds())], &[]);
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let error = m.latest_report().error.unwrap_or_default();
    assert!(
        error.contains("not enough free space") && error.contains("nothing was downloaded"),
        "{error}"
    );
    let moved = down_bytes(&relay);
    assert!(moved < 256 << 10, "{moved} bytes: NARs were fetched");
    for p in &paths {
        assert!(!std::path::Path::new(p).exists(), "{p} entered the store");
    }
}
