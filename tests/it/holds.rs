//! Issue #24 item 3: a rollback is a hold until released. A plain publish leaves a
//! rolled-back host's live version and says how to release it; `publish --host` or
//! `rollback --release` releases it; `bento status`, `bento versions` and `bento journal`
//! say what happened.

use std::fs;
use std::process::Output;

use crate::agent::{code, fleet, text, write_version, Machine, EXIT_NOOP, EXIT_UPDATED};
use crate::common::bento;
use crate::common::sshd::Sshd;
use crate::signing::live;

fn run(sshd: &Sshd, args: &[&str]) -> Output {
    bento()
        .args(args)
        .arg("--fleet")
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .output()
        .expect("run bento")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn runs(m: &Machine<'_>, v: &str) -> bool {
    m.profile_target()
        .is_some_and(|t| t.ends_with(&format!("-{v}")))
}

#[test]
fn a_rollback_holds_until_released_and_the_journal_says_so() {
    let sshd = Sshd::start(&["alpha", "beta"]);
    fleet(&sshd);
    let a = Machine::new(&sshd, "alpha", "");
    let b = Machine::new(&sshd, "beta", "");
    write_version(&sshd, "2");
    sshd.publish();
    for m in [&a, &b] {
        assert_eq!(code(&m.update()), EXIT_UPDATED);
    }
    let v2 = live(&sshd, "alpha");

    let out = run(&sshd, &["rollback", "alpha"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let rolled = live(&sshd, "alpha");
    assert_eq!(code(&a.update()), EXIT_UPDATED);
    assert!(runs(&a, "1"), "{:?}", a.profile_target());

    // A plain publish of version 3 leaves alpha where the operator put it, and says how
    // to release it; beta moves on.
    write_version(&sshd, "3");
    // `--dry-run` says so first: alpha held, beta a new version; no journal line, no
    // released hold, nothing written.
    let before = crate::common::tree_fingerprint(&sshd.chroot());
    let out = run(&sshd, &["publish", "--no-eval", "--dry-run", "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["hosts"][0]["host"], "alpha", "{doc}");
    assert_eq!(doc["hosts"][0]["result"], "held", "{doc}");
    assert_eq!(doc["hosts"][0]["new_version"], false, "{doc}");
    assert_eq!(doc["hosts"][1]["result"], "new version", "{doc}");
    assert_eq!(doc["hosts"][1]["reason"], "configuration changed", "{doc}");
    assert_eq!(crate::common::tree_fingerprint(&sshd.chroot()), before);
    let out = run(&sshd, &["publish", "--no-eval"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("not publishing alpha")
            && err.contains("rolled back")
            && err.contains("bento publish --host alpha")
            && err.contains("bento rollback --release alpha"),
        "{err}"
    );
    assert!(!stdout(&out).contains("alpha"), "{}", stdout(&out));
    assert_eq!(
        live(&sshd, "alpha"),
        rolled,
        "alpha's live version is untouched"
    );
    assert_eq!(code(&a.update()), EXIT_NOOP);
    assert!(runs(&a, "1"));
    assert_eq!(code(&b.update()), EXIT_UPDATED);
    assert!(runs(&b, "3"));

    // status names the rollback and the version it was rolled back from.
    let out = run(&sshd, &["status", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["host"] == "alpha")
        .unwrap()
        .clone();
    assert_eq!(row["state"], "rolled-back", "{row}");
    let note = row["error"].as_str().unwrap_or_default();
    assert!(
        note.contains(&format!("rolled back from {}", v2.short())),
        "{row}"
    );

    // versions: serial, digest, what happened.
    let out = run(&sshd, &["versions", "alpha", "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let versions: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_digest = |d: &bento::protocol::manifest::Digest| {
        versions
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["digest"] == d.to_string())
            .cloned()
            .unwrap_or_else(|| panic!("{d} not listed: {versions}"))
    };
    let held = by_digest(&rolled);
    assert_eq!(held["live"], true);
    assert!(held["history"].to_string().contains("held"), "{held}");
    assert!(
        by_digest(&v2)["history"]
            .to_string()
            .contains("rolled back from"),
        "{versions}"
    );

    // `rollback --release` lifts the hold: the next plain publish moves alpha on.
    let out = run(&sshd, &["rollback", "--release", "alpha"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(stdout(&out).contains("alpha  released"), "{}", stdout(&out));
    let out = run(&sshd, &["publish", "--no-eval"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(!stderr(&out).contains("not publishing alpha"));
    assert_eq!(code(&a.update()), EXIT_UPDATED);
    assert!(runs(&a, "3"));

    // Rolled back again, then released by naming it: `publish --host alpha`.
    assert_eq!(code(&run(&sshd, &["rollback", "alpha"])), 0);
    write_version(&sshd, "4");
    let out = run(&sshd, &["publish", "--no-eval", "--host", "alpha"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        stderr(&out).contains("rollback hold released"),
        "{}",
        text(&out)
    );
    assert_eq!(code(&a.update()), EXIT_UPDATED);
    assert!(runs(&a, "4"));

    // The journal: every publish, rollback and release, in order, with who and serials.
    let out = run(&sshd, &["journal", "--json"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let journal: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let actions: Vec<&str> = journal
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "publish", "publish", "rollback", "publish", "release", "publish", "rollback",
            "publish"
        ],
        "{journal}"
    );
    let skipped = &journal[3]["hosts"];
    assert!(
        skipped.to_string().contains("\"held\"") && skipped.to_string().contains("\"serial\""),
        "{skipped}"
    );
    assert!(journal[2]["who"].as_str().is_some_and(|w| !w.is_empty()));
    let text_out = stdout(&run(&sshd, &["journal"]));
    assert!(
        text_out.contains("rollback") && text_out.contains("alpha  rolled back"),
        "{text_out}"
    );
    // The journal lives with the publisher's state, outside every host's area.
    assert!(sshd.chroot().join(".bento/journal.jsonl").exists());
    assert!(!fs::read_dir(sshd.host_dir("alpha")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("journal")));
}
