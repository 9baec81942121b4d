//! Issue #27: the freshness window through a whole run. A host whose applied version demands
//! a stamp (`freshness_secs`) reads it only when the remembered one is half gone; a missing
//! or run-out stamp is `stale` (exit 13, the heartbeat says so, nothing done), and a fresh one
//! clears it. Without `trusted_keys` the stamp's signature is not checked (its names and time
//! are), so these stamps carry none.

use super::*;
use crate::protocol::freshness::FreshStamp;
use crate::protocol::settings::{HostSettings, FILE};

const WINDOW: u64 = 3600;

/// Publishes a flake version building to `system` whose settings demand a stamp.
fn publish_fresh(bed: &Bed, system: &str, serial: u64) -> Digest {
    let mut settings = HostSettings::resolve(&HostName::new("alpha").unwrap(), &[]);
    settings.freshness_secs = Some(WINDOW);
    let mut config = Vec::new();
    for (path, body) in [
        (
            "flake.nix".to_owned(),
            format!("{{ }} # {system}\n").into_bytes(),
        ),
        (SYSTEM_FILE.to_owned(), system.as_bytes().to_vec()),
        (FILE.to_owned(), settings.to_bytes()),
    ] {
        let digest = Digest::of(&body);
        std::fs::write(layout::object(&bed.chroot, &digest), &body).unwrap();
        config.push(ConfigEntry::File {
            path: RelPath::new(&path).unwrap(),
            size: body.len() as u64,
            sha256: digest,
            executable: false,
        });
    }
    let mut m = Manifest {
        format: 1,
        host: HostName::new("alpha").unwrap(),
        created: Timestamp::millis(bed.now.get()),
        serial,
        source_commit: None,
        dirty: false,
        build: Build::Flake,
        system: None,
        config,
        tree: None,
        files: Vec::new(),
    };
    m.canonicalize();
    let bytes = m.to_bytes();
    let digest = Digest::of(&bytes);
    std::fs::write(layout::manifest(&bed.chroot, &digest), &bytes).unwrap();
    stamp(bed, digest, serial, bed.now.get());
    std::fs::write(layout::current(&bed.chroot), layout::current_text(&digest)).unwrap();
    digest
}

/// Writes the stamp of `version`, vouching for it `WINDOW` seconds from `from`.
fn stamp(bed: &Bed, version: Digest, serial: u64, from: SystemTime) {
    stamp_in(&bed.chroot, version, serial, from);
}

/// The same, into the tree at `root` (a mirror's).
fn stamp_in(root: &std::path::Path, version: Digest, serial: u64, from: SystemTime) {
    let s = FreshStamp::new(
        &HostName::new("alpha").unwrap(),
        version,
        serial,
        from,
        Duration::from_secs(WINDOW),
    );
    let mut bytes = serde_json::to_vec(&s).unwrap();
    bytes.extend_from_slice(b"\n(unsigned)\n");
    std::fs::write(root.join(layout::Key::Fresh(version).path()), bytes).unwrap();
}

fn stamp_path(bed: &Bed, version: Digest) -> PathBuf {
    bed.chroot.join(layout::Key::Fresh(version).path())
}

#[test]
fn agent_is_stale_without_a_live_stamp_and_changes_nothing() {
    let bed = Bed::new("");
    let v1 = publish_fresh(&bed, "one", 1);
    assert_eq!(bed.run().exit_code(), RunResult::EXIT_UPDATED);
    assert!(bed.state().fresh.is_some_and(|f| f.version == v1));
    bed.take_calls();

    // With most of the window left the remembered stamp is enough: not even read.
    std::fs::remove_file(stamp_path(&bed, v1)).unwrap();
    bed.later(WINDOW / 4);
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_NOOP, "{r:?}");

    // Half the window gone: read again, and the source has none.
    bed.later(WINDOW / 2);
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_STALE, "{r:?}");
    assert!(
        matches!(&r, RunResult::Stale { reason } if reason.contains("no freshness stamp")),
        "{r:?}"
    );
    assert!(bed.heartbeat().stale.is_some());
    assert!(bed.state().stale.is_some());

    // The server refreshed it: fresh again, the word gone from the heartbeat.
    stamp(&bed, v1, 1, bed.now.get());
    assert_eq!(bed.run().exit_code(), RunResult::EXIT_NOOP);
    assert_eq!(bed.heartbeat().stale, None);
    assert_eq!(bed.state().stale, None);

    // A newer version whose stamp ran out (a store frozen since): not applied.
    bed.later(10);
    let v2 = publish_fresh(&bed, "two", 2);
    bed.later(WINDOW + 301);
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_STALE, "{r:?}");
    assert!(
        matches!(&r, RunResult::Stale { reason } if reason.contains("ran out") && reason.contains(&v2.short())),
        "{r:?}"
    );
    assert_eq!(bed.take_calls(), Vec::<String>::new(), "nothing was done");
    assert_eq!(bed.state().applied.map(|a| a.version), Some(v1));
}

/// "Stale on every source it reaches": a server whose stamp ran out sends the run to the
/// mirrors; one the server's admin still refreshes keeps the host fresh, and only when the
/// mirror runs out too is the host stale.
#[test]
fn a_stale_server_sends_the_run_to_a_fresh_mirror_and_stale_everywhere_is_stale() {
    let (bed, mirrors, _t) = super::mirrors::bed_with_mirrors(1);
    let v1 = publish_fresh(&bed, "one", 1);
    assert_eq!(bed.run().exit_code(), RunResult::EXIT_UPDATED);
    super::mirrors::copy_tree(&bed.chroot, &mirrors[0]);
    bed.take_calls();

    bed.later(WINDOW + 301);
    stamp_in(&mirrors[0], v1, 1, bed.now.get());
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_NOOP, "{r:?}");
    assert_eq!(bed.state().stale, None);
    assert_eq!(bed.heartbeat().stale, None);

    bed.later(WINDOW + 301);
    let r = bed.run();
    assert_eq!(r.exit_code(), RunResult::EXIT_STALE, "{r:?}");
    assert!(bed.heartbeat().stale.is_some());
    assert_eq!(bed.take_calls(), Vec::<String>::new(), "nothing was done");
}
