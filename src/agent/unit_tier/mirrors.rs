//! Mirrors (issue #27): `server` first, the mirrors when it fails or serves an older
//! version than the applied one; the highest serial among the sources read wins; an older
//! mirror is skipped with a note; reports wait in the spool for the server.

use std::path::{Path, PathBuf};

use super::*;

/// A copy of the host's tree (everything but `logs/`), as `bento publish --export` or
/// rsync makes it.
pub(super) fn copy_tree(from: &Path, to: &Path) {
    for d in [layout::MANIFESTS, layout::OBJECTS, layout::LOGS] {
        std::fs::create_dir_all(to.join(d)).unwrap();
    }
    for d in [layout::MANIFESTS, layout::OBJECTS] {
        for e in std::fs::read_dir(from.join(d)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(d).join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(layout::current(from), layout::current(to)).unwrap();
}

/// A bed whose agent.toml lists `n` `file://` mirrors (empty until copied into).
pub(super) fn bed_with_mirrors(n: usize) -> (Bed, Vec<PathBuf>, tempfile::TempDir) {
    let base = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..n)
        .map(|i| base.path().join(format!("mirror{i}")))
        .collect();
    for d in &dirs {
        for sub in [layout::MANIFESTS, layout::OBJECTS, layout::LOGS] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
    }
    let list: Vec<String> = dirs
        .iter()
        .map(|d| format!("\"file://{}\"", d.display()))
        .collect();
    let bed = Bed::new(&format!("mirrors = [{}]\n", list.join(", ")));
    (bed, dirs, base)
}

fn system_of(r: &RunResult) -> String {
    match r {
        RunResult::Updated(rep) => name(&rep.system_after).to_owned(),
        other => panic!("expected an update, got {other:?}"),
    }
}

#[test]
fn agent_updates_from_a_mirror_while_the_server_is_down_and_reports_once_it_is_back() {
    let (bed, mirrors, _t) = bed_with_mirrors(1);
    bed.publish_numbered("v1", 1, 1);
    copy_tree(&bed.chroot, &mirrors[0]);
    bed.host.server_down.set(true);

    let r = bed.run();
    assert_eq!(system_of(&r), "v1");
    let RunResult::Updated(report) = r else {
        unreachable!()
    };
    // The confirmation went through the mirror: the new system stays.
    assert!(
        report.log_tail.contains("reached mirror"),
        "{}",
        report.log_tail
    );
    assert_eq!(bed.latest(), None, "nothing reached the server");
    assert_eq!(bed.spooled(), 1, "the report waits in the spool");
    assert!(
        !mirrors[0].join("logs/latest.json").exists(),
        "a mirror is never written to"
    );
    assert!(bed.state().unreachable.is_some(), "agent status says so");

    bed.host.server_down.set(false);
    bed.connects.borrow_mut().clear();
    let r = bed.run();
    assert!(matches!(r, RunResult::NoOp { .. }), "{r:?}");
    assert_eq!(bed.latest().map(|l| l.id), Some(report.id));
    assert_eq!(bed.spooled(), 0);
    assert!(bed.state().unreachable.is_none());
    // The no-change poll with the server up never contacts a mirror.
    assert_eq!(*bed.connects.borrow(), [bed.cfg.server.to_string()]);
}

#[test]
fn agent_skips_a_mirror_older_than_the_applied_version() {
    let (bed, mirrors, _t) = bed_with_mirrors(1);
    bed.publish_numbered("v1", 1, 1);
    copy_tree(&bed.chroot, &mirrors[0]);
    bed.publish_numbered("v2", 2, 2);
    assert_eq!(system_of(&bed.run()), "v2");
    bed.take_calls();

    bed.host.server_down.set(true);
    let r = bed.run();
    let RunResult::NoOp { reason } = r else {
        panic!("{r:?}")
    };
    assert!(reason.contains("older than the applied"), "{reason}");
    assert!(bed.take_calls().iter().all(|c| !c.starts_with("activate")));
    assert_eq!(bed.state().last.unwrap().outcome, Outcome::Success);
}

#[test]
fn agent_applies_the_highest_serial_among_the_sources_it_reads() {
    let (bed, mirrors, _t) = bed_with_mirrors(2);
    bed.publish_numbered("v1", 1, 1);
    assert_eq!(system_of(&bed.run()), "v1");
    let v1_current = std::fs::read(layout::current(&bed.chroot)).unwrap();
    bed.publish_numbered("v2", 2, 2);
    copy_tree(&bed.chroot, &mirrors[0]);
    bed.publish_numbered("v3", 3, 3);
    copy_tree(&bed.chroot, &mirrors[1]);
    // The server is restored from an old backup: it serves v1 again, which is applied.
    std::fs::write(layout::current(&bed.chroot), &v1_current).unwrap();
    let r = bed.run();
    assert!(matches!(r, RunResult::NoOp { .. }), "{r:?}");

    // The server down: both mirrors are read, the higher serial is applied.
    bed.host.server_down.set(true);
    assert_eq!(system_of(&bed.run()), "v3");
    assert_eq!(bed.state().applied.unwrap().serial, Some(3));

    // The server back, serving v1 (older than the applied v3): the mirrors are read again;
    // the first holds v2 (older: skipped), the second v3 (applied: up to date).
    bed.host.server_down.set(false);
    let r = bed.run();
    let RunResult::NoOp { reason } = r else {
        panic!("{r:?}")
    };
    assert!(reason.contains("up to date"), "{reason}");
    // A newer version reaches the first mirror: applied though the server is behind.
    bed.publish_numbered("v4", 4, 4);
    copy_tree(&bed.chroot, &mirrors[0]);
    std::fs::write(layout::current(&bed.chroot), &v1_current).unwrap();
    assert_eq!(system_of(&bed.run()), "v4");
}
