//! Issue #23 item 15: switching on `[secrets] encrypt = true` leaves the kept versions'
//! plaintext objects in the chroot until newer versions replace them. Publish says so,
//! naming the versions, and that rolling back to them ships the plaintext again.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::agent::{fleet, write_version};
use crate::common::bento;
use crate::common::sshd::Sshd;

fn publish(sshd: &Sshd) -> Output {
    bento()
        .args(["publish", "--no-eval", "--json", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .output()
        .unwrap()
}

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file()
                && fs::read(&p)
                    .unwrap()
                    .windows(needle.len())
                    .any(|w| w == needle)
            {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn switching_encryption_on_says_which_kept_versions_still_hold_plaintext() {
    let sshd = Sshd::start(&["alpha"]);
    let secret = format!("PLAINTEXT-{}", sshd.prefix);
    fleet(&sshd);
    fs::write(
        sshd.fleet()
            .join("hosts/alpha/files/alpha/etc/bento-it/secret"),
        format!("{secret}\n"),
    )
    .unwrap();
    write_version(&sshd, "2");
    assert!(publish(&sshd).status.success());
    let toml = sshd.fleet().join("bento.toml");
    let mut text = fs::read_to_string(&toml).unwrap();
    text.push_str("\n[secrets]\nencrypt = true\n");
    fs::write(&toml, text).unwrap();

    write_version(&sshd, "3");
    let out = publish(&sshd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings = json[0]["warnings"].to_string();
    assert!(
        warnings.contains("in the clear") && warnings.contains("rolling back"),
        "{json}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("in the clear"));
    assert!(
        !files_containing(&sshd.chroot(), secret.as_bytes()).is_empty(),
        "what the warning says: the kept version still holds it"
    );

    // Once newer versions replaced every kept plaintext one, the warning and the plaintext
    // are gone.
    for v in ["4", "5"] {
        write_version(&sshd, v);
        assert!(publish(&sshd).status.success());
    }
    write_version(&sshd, "6");
    let out = publish(&sshd);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !json[0]["warnings"].to_string().contains("in the clear"),
        "{json}"
    );
    assert_eq!(
        files_containing(&sshd.chroot(), secret.as_bytes()),
        Vec::<PathBuf>::new()
    );
}
