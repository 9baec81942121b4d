//! Scenario 4: publishing a generated fleet (bench/gen-fleet.py, seed 7: classic hosts,
//! 90 % of each host's files shared through a `common/` link, 1 KiB per file). bento cold,
//! with nothing changed, and after one common file changed; against the shell way: per
//! host `rsync -rL` into a staging copy, `diff -r` against the chroot copy, `rsync --delete`
//! into place. Disk used by both chroots, against the fleet's unique content.
//!
//! Publishing is local work; it runs as `nobody` (as bench/publish.sh always did), so bento
//! leaves owners alone and needs no accounts.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::proc::{du, run_ok};
use crate::server::{bento_bin, Scratch};
use crate::table::{fmt_value, Row, Samples, Unit};
use crate::Config;

const BASELINE_SCRIPT: &str = r#"
set -eu
for h in $(ls -d "$FLEET"/hosts/* | head -n "$LIMIT"); do
  n=${h##*/}
  mkdir -p "$STAGE/$n" "$CHROOT/$n"
  rsync -rL --delete "$h/" "$STAGE/$n/"
  diff -r -q "$STAGE/$n" "$CHROOT/$n" >/dev/null || rsync -r --delete "$STAGE/$n/" "$CHROOT/$n/"
done
"#;

fn as_nobody(args: &[&std::ffi::OsStr]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(args);
    cmd
}

pub fn bento_publish(fleet: &Path, chroot: &Path) -> f64 {
    let r = run_ok(
        &mut as_nobody(&[
            bento_bin().as_ref(),
            "--fleet".as_ref(),
            fleet.as_os_str(),
            "publish".as_ref(),
            // What is measured is the copy into the chroots, against rsync's; evaluation
            // (which the baseline does not do, and nobody cannot run in a root-owned
            // single-user store) would swamp it.
            "--no-eval".as_ref(),
            "--chroot".as_ref(),
            chroot.as_os_str(),
        ]),
        Duration::from_secs(900),
    );
    r.elapsed.as_secs_f64()
}

fn baseline_publish(fleet: &Path, stage: &Path, chroot: &Path, limit: usize) -> f64 {
    let r = run_ok(
        Command::new("bash")
            .args(["-c", BASELINE_SCRIPT])
            .env("FLEET", fleet)
            .env("STAGE", stage)
            .env("CHROOT", chroot)
            .env("LIMIT", limit.to_string()),
        Duration::from_secs(1800),
    );
    r.elapsed.as_secs_f64()
}

/// The fleet's unique content: every distinct file (by sha256) once, without following
/// links (so `common/` counts once): (apparent bytes, allocated bytes).
fn unique_content(fleet: &Path) -> (u64, u64) {
    fn walk(dir: &Path, seen: &mut HashMap<[u8; 32], (u64, u64)>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let meta = fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                walk(&e.path(), seen);
            } else if meta.is_file() && e.file_name() != "bento.toml" {
                let digest: [u8; 32] = Sha256::digest(fs::read(e.path()).unwrap()).into();
                seen.insert(digest, (meta.len(), meta.blocks() * 512));
            }
        }
    }
    let mut seen = HashMap::new();
    walk(fleet, &mut seen);
    seen.values()
        .fold((0, 0), |(a, b), (len, blocks)| (a + len, b + blocks))
}

/// What bento's side of the scenario measured in one manifest format.
struct Measured {
    cold: Samples,
    nochange: Samples,
    change: Samples,
    disk_cold: (u64, u64),
    disk_after: (u64, u64),
}

/// Cold publishes (each into a fresh chroot), no-change publishes, then one common file
/// changed before each publish, with `[server] format = format`; disk by `du`.
fn measure_bento(fleet: &Path, out: &Path, format: u32, cold_reps: usize, reps: usize) -> Measured {
    let toml = fleet.join("bento.toml");
    let text = fs::read_to_string(&toml).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("format ="))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(
        &toml,
        text.replacen("[server]\n", &format!("[server]\nformat = {format}\n"), 1),
    )
    .unwrap();
    let chroot_n = |i: usize| -> PathBuf { out.join(format!("f{format}-chroot{i}")) };
    let mut cold = Samples::default();
    // Each repetition publishes into a chroot of its own, all left to the scratch
    // directory's removal at the end: removing one between publishes would time the
    // filesystem's after-effects of freeing a fleet's inodes (without a journal, ext4 skips
    // inodes freed in the last 30 s when it allocates), not bento. A few hundred MB.
    for i in 0..cold_reps {
        eprintln!("   format {format}: cold publish {}/{cold_reps}", i + 1);
        cold.push(bento_publish(fleet, &chroot_n(i)));
    }
    let chroot = chroot_n(cold_reps - 1);
    let disk_cold = (du(&chroot, true), du(&chroot, false));
    let mut nochange = Samples::default();
    for _ in 0..reps {
        nochange.push(bento_publish(fleet, &chroot));
    }
    let mut change = Samples::default();
    for i in 0..reps {
        change_common(fleet, format as usize * 100 + i);
        change.push(bento_publish(fleet, &chroot));
    }
    let disk_after = (du(&chroot, true), du(&chroot, false));
    Measured {
        cold,
        nochange,
        change,
        disk_cold,
        disk_after,
    }
}

fn change_common(fleet: &Path, i: usize) {
    let p = fleet.join("common/m0/mod0.nix");
    let mut text = fs::read_to_string(&p).unwrap();
    text.push_str(&format!("# changed {i}\n"));
    fs::write(&p, text).unwrap();
}

pub fn run(cfg: &Config, rows: &mut Vec<Row>) {
    let (hosts, files) = if cfg.smoke {
        (4, 30)
    } else if cfg.quick {
        (20, 300)
    } else {
        (1000, 300)
    };
    let scratch = Scratch::new("publish");
    let fleet = scratch.join("fleet");
    run_ok(
        Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/gen-fleet.py"))
            .arg(&fleet)
            .args(["--hosts", &hosts.to_string(), "--files", &files.to_string()]),
        Duration::from_secs(600),
    );
    let out = scratch.join("out");
    fs::create_dir(&out).unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o755)).unwrap();
    run_ok(
        Command::new("chown").arg("65534:65534").arg(&out),
        Duration::from_secs(10),
    );
    let reps = cfg.reps;
    // Cold publishes take ~15 s each at full size: fewer of them.
    let cold_reps = if cfg.quick { reps } else { reps.min(3) };
    let baseline_reps = if cfg.quick { reps } else { 1 };
    // The shell loop takes ~0.3 s per host per pass here, so a full run times it on the
    // first 100 hosts and scales by hosts/100: every host is an independent iteration of
    // the same work, so the cost is linear in the host count (the disk exactly so).
    let limit = if cfg.quick { hosts } else { 100 };
    let scale = hosts as f64 / limit as f64;
    let scaled = |s: Samples| Samples(s.0.iter().map(|v| v * scale).collect());

    // bento in each manifest format, on its own chroots, the same changes in the same order.
    let one = measure_bento(&fleet, &out, 1, cold_reps, reps);
    let two = measure_bento(&fleet, &out, 2, cold_reps, reps);

    // The baseline, from the same fleet, on the same disk.
    let base = scratch.join("baseline");
    let (stage, bchroot) = (base.join("stage"), base.join("chroot"));
    let (mut b_cold, mut b_nochange) = (Samples::default(), Samples::default());
    for i in 0..baseline_reps {
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&stage).unwrap();
        fs::create_dir_all(&bchroot).unwrap();
        eprintln!("   baseline cold publish {}/{baseline_reps}", i + 1);
        b_cold.push(baseline_publish(&fleet, &stage, &bchroot, limit));
    }
    let b_disk = (du(&bchroot, true), du(&bchroot, false));
    for i in 0..baseline_reps {
        eprintln!("   baseline no-change publish {}/{baseline_reps}", i + 1);
        b_nochange.push(baseline_publish(&fleet, &stage, &bchroot, limit));
    }

    // One common file changes, as the bento runs saw it.
    let mut b_change = Samples::default();
    for i in 0..baseline_reps {
        change_common(&fleet, 1000 + i);
        eprintln!("   baseline one-change publish {}/{baseline_reps}", i + 1);
        b_change.push(baseline_publish(&fleet, &stage, &bchroot, limit));
    }
    let unique = unique_content(&fleet);

    let (b_cold, b_nochange, b_change) = (scaled(b_cold), scaled(b_nochange), scaled(b_change));
    let b_disk = (
        (b_disk.0 as f64 * scale) as u64,
        (b_disk.1 as f64 * scale) as u64,
    );
    let s = if limit == hosts {
        format!("4. publish {hosts} hosts × {files} files, 90 % shared")
    } else {
        format!(
            "4. publish {hosts} hosts × {files} files, 90 % shared (baseline timed on {limit} hosts, ×{scale:.0})"
        )
    };
    for (bento, format) in [(&one, 1), (&two, 2)] {
        let f = |m: &str| format!("{m} (format {format})");
        let goal_cold = (format == 2).then(|| {
            let m = bento.cold.median();
            (format!("≤ 6 s; {m:.2} s"), m <= 6.0)
        });
        let mut row = Row::new(&s, &f("cold publish"), Unit::Secs)
            .bento(bento.cold.clone())
            .baseline(b_cold.clone());
        if let Some((text, met)) = goal_cold {
            row = row.goal(text, met);
        }
        rows.push(row);
        let ratio = b_nochange.median() / bento.nochange.median();
        rows.push(
            Row::new(&s, &f("no-change publish"), Unit::Secs)
                .bento(bento.nochange.clone())
                .baseline(b_nochange.clone())
                .goal(format!("≥ 100× faster; {ratio:.0}×"), ratio >= 100.0),
        );
        let mut row = Row::new(&s, &f("one common file changed"), Unit::Secs)
            .bento(bento.change.clone())
            .baseline(b_change.clone());
        if format == 2 {
            let m = bento.change.median();
            row = row.goal(format!("≤ 1 s; {m:.2} s"), m <= 1.0);
        }
        rows.push(row);
    }
    rows.push(
        Row::new(&s, "unique content (apparent / allocated)", Unit::Bytes)
            .bento(Samples::one(unique.0 as f64))
            .baseline(Samples::one(unique.1 as f64))
            .note(format!(
                "{} / {} on disk",
                fmt_value(unique.0 as f64, Unit::Bytes),
                fmt_value(unique.1 as f64, Unit::Bytes)
            )),
    );
    for (label, (apparent, allocated), baseline) in [
        (
            "disk after cold publish (format 1)",
            one.disk_cold,
            Some(b_disk),
        ),
        (
            "disk after the changes, old versions kept (format 1)",
            one.disk_after,
            None,
        ),
        (
            "disk after cold publish (format 2)",
            two.disk_cold,
            Some(b_disk),
        ),
        (
            "disk after the changes, old versions kept (format 2)",
            two.disk_after,
            None,
        ),
    ] {
        let r = allocated as f64 / unique.1 as f64;
        let ra = apparent as f64 / unique.0 as f64;
        let mut row = Row::new(&s, &format!("{label}: allocated"), Unit::Bytes)
            .bento(Samples::one(allocated as f64))
            .goal(
                format!(
                    "≤ 1.2× unique content; {r:.2}× allocated, {ra:.2}× apparent ({})",
                    fmt_value(apparent as f64, Unit::Bytes)
                ),
                r <= 1.2,
            );
        if let Some(b) = baseline {
            row = row.baseline(Samples::one(b.1 as f64));
        }
        rows.push(row);
    }
}
