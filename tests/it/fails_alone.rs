//! Issue #24 item 8 and issue #23 item 17 (third note): a host whose `.age` file is not
//! encrypted to its key, or whose directory holds a link out of the fleet repo, fails
//! alone; the other hosts publish, and the summary names the host and the fixing command.

use std::fs;
use std::process::{Command, Output};

use crate::agent::fleet;
use crate::common::bento;
use crate::common::sshd::Sshd;

fn publish(sshd: &Sshd, extra: &[&str]) -> Output {
    bento()
        .args(["publish", "--no-eval", "--json", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .args(extra)
        .output()
        .unwrap()
}

fn row<'a>(json: &'a serde_json::Value, host: &str) -> &'a serde_json::Value {
    json.as_array()
        .unwrap()
        .iter()
        .find(|r| r["host"] == host)
        .unwrap_or_else(|| panic!("{host} not in {json}"))
}

#[test]
fn a_secret_for_another_key_fails_only_its_host() {
    let sshd = Sshd::start(&["alpha", "beta"]);
    fleet(&sshd);
    let alpha_before = fs::read_to_string(sshd.host_dir("alpha").join("current")).unwrap();
    // alpha's secret is encrypted to someone else's key (a changed host key).
    let files = sshd.fleet().join("hosts/alpha/files/alpha");
    fs::remove_file(files.join("etc/bento-it/secret")).unwrap();
    fs::write(
        sshd.fleet().join("hosts/alpha/files.toml"),
        "[\"alpha/etc/bento-it/secret.age\"]\nmode = \"0640\"\n",
    )
    .unwrap();
    let plain = sshd.dir.join("plain");
    fs::write(&plain, "token\n").unwrap();
    let st = Command::new("/usr/bin/age")
        .args(["-a", "-r"])
        .arg(sshd.public_key("beta"))
        .arg("-o")
        .arg(files.join("etc/bento-it/secret.age"))
        .arg(&plain)
        .status()
        .unwrap();
    assert!(st.success());
    crate::agent::write_version(&sshd, "2");

    let out = publish(&sshd, &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let alpha = row(&json, "alpha");
    assert_eq!(alpha["status"], "failed", "{json}");
    let error = alpha["error"].as_str().unwrap();
    assert!(
        error.contains("secret.age") && error.contains("bento secret rekey --host alpha"),
        "{error}"
    );
    assert_eq!(row(&json, "beta")["status"], "published", "{json}");
    assert_eq!(
        fs::read_to_string(sshd.host_dir("alpha").join("current")).unwrap(),
        alpha_before,
        "alpha stays on its live version"
    );
}

#[test]
fn a_link_out_of_the_repo_fails_only_its_host() {
    let sshd = Sshd::start(&["alpha", "beta"]);
    fleet(&sshd);
    std::os::unix::fs::symlink("/etc/hostname", sshd.fleet().join("hosts/alpha/stolen")).unwrap();
    crate::agent::write_version(&sshd, "2");

    for args in [&[][..], &["--host", "alpha", "--host", "beta"][..]] {
        let out = publish(&sshd, args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let alpha = row(&json, "alpha");
        assert_eq!(alpha["status"], "failed", "{json}");
        let error = alpha["error"].as_str().unwrap();
        assert!(
            error.contains("outside the fleet repo")
                && error.contains("bento publish --host alpha"),
            "{error}"
        );
        assert_ne!(row(&json, "beta")["status"], "failed", "{json}");
    }
    // Named alone, it fails alone, in the summary.
    let out = publish(&sshd, &["--host", "alpha"]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row(&json, "alpha")["status"], "failed", "{json}");
}
