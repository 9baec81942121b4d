//! Signed snapshots: `bento keygen`, signatures the real `ssh-keygen -Y` accepts, and an
//! agent that refuses unsigned, wrongly signed and replayed manifests.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use bento::protocol::report::Outcome;

use crate::agent::{code, fleet, text, write_version, Machine, EXIT_FAILED, EXIT_UPDATED};
use crate::common::bento;
use crate::common::sshd::Sshd;

pub(crate) fn keygen(path: &Path) -> String {
    let out = bento()
        .arg("keygen")
        .arg("--output")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub(crate) fn set_signing_key(sshd: &Sshd, key: &Path) {
    let toml = sshd.fleet().join("bento.toml");
    let text = fs::read_to_string(&toml).unwrap();
    let text = text.replacen(
        "[server]\n",
        &format!("[server]\nsigning_key = \"{}\"\n", key.display()),
        1,
    );
    fs::write(toml, text).unwrap();
}

pub(crate) fn live(sshd: &Sshd, host: &str) -> bento::protocol::manifest::Digest {
    bento::protocol::layout::parse_current(
        &fs::read_to_string(sshd.host_dir(host).join("current")).unwrap(),
    )
    .unwrap()
}

#[test]
fn publish_signs_manifests_that_ssh_keygen_accepts() {
    let sshd = Sshd::start(&["alpha"]);
    let key = sshd.dir.join("signing/key");
    let public = keygen(&key);
    assert!(public.starts_with("ssh-ed25519 "), "{public}");
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = bento()
        .arg("keygen")
        .arg("--output")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!again.status.success(), "keygen must not overwrite a key");

    set_signing_key(&sshd, &key);
    fleet(&sshd);
    let dir = sshd.host_dir("alpha");
    let digest = live(&sshd, "alpha");
    let manifest = bento::protocol::layout::manifest(&dir, &digest);
    let sig = bento::protocol::layout::signature(&dir, &digest);

    let check = Command::new("ssh-keygen")
        .args(["-Y", "check-novalidate", "-n", "bento", "-s"])
        .arg(&sig)
        .stdin(fs::File::open(&manifest).unwrap())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "check-novalidate: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    let signers = sshd.dir.join("allowed_signers");
    fs::write(&signers, format!("fleet {public}\n")).unwrap();
    let verify = |input: &Path| {
        Command::new("ssh-keygen")
            .args(["-Y", "verify", "-f"])
            .arg(&signers)
            .args(["-I", "fleet", "-n", "bento", "-s"])
            .arg(&sig)
            .stdin(fs::File::open(input).unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(
        verify(&manifest),
        "ssh-keygen -Y verify accepts the signature"
    );
    let tampered = sshd.dir.join("tampered.json");
    let mut bytes = fs::read(&manifest).unwrap();
    bytes[10] ^= 1;
    fs::write(&tampered, bytes).unwrap();
    assert!(
        !verify(&tampered),
        "ssh-keygen -Y verify refuses tampered bytes"
    );
}

#[test]
fn a_signing_key_inside_the_fleet_repo_is_refused() {
    let sshd = Sshd::start(&["alpha"]);
    // keygen refuses to write there (tests/it/init.rs); a key copied in by hand is refused
    // by publish all the same.
    let made = sshd.dir.join("signing/key");
    keygen(&made);
    let key = sshd.fleet().join("secrets/key");
    fs::create_dir_all(key.parent().unwrap()).unwrap();
    fs::rename(&made, &key).unwrap();
    set_signing_key(&sshd, &key);
    let out = bento()
        .args(["publish", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("inside the fleet repo"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_agent_accepts_only_trusted_current_signatures() {
    let sshd = Sshd::start(&["alpha"]);
    let key = sshd.dir.join("signing/key");
    let public = keygen(&key);
    let other = keygen(&sshd.dir.join("signing/other"));
    set_signing_key(&sshd, &key);
    fleet(&sshd);
    let trusted = format!("trusted_keys = [\"{other}\", \"{public}\"]\n");
    let m = Machine::new(&sshd, "alpha", &trusted);

    // Signed by one of the trusted keys (rotation: either will do).
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let v1 = live(&sshd, "alpha");

    // Unsigned.
    write_version(&sshd, "2");
    sshd.publish();
    let v2 = live(&sshd, "alpha");
    fs::remove_file(bento::protocol::layout::signature(
        &sshd.host_dir("alpha"),
        &v2,
    ))
    .unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let r = m.latest_report();
    assert_eq!(r.outcome, Outcome::Failure);
    assert!(r.error.as_deref().unwrap().contains("not signed"), "{r:?}");

    // Signed by a key the host does not trust.
    let stranger = sshd.dir.join("signing/stranger");
    keygen(&stranger);
    let signer = bento::protocol::signing::Signer::load(&stranger).unwrap();
    let bytes = fs::read(bento::protocol::layout::manifest(
        &sshd.host_dir("alpha"),
        &v2,
    ))
    .unwrap();
    fs::write(
        bento::protocol::layout::signature(&sshd.host_dir("alpha"), &v2),
        signer.sign(&bytes).unwrap(),
    )
    .unwrap();
    let out = m.update_with(&[], &["--force"]);
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    assert!(m.latest_report().error.unwrap().contains("no trusted key"));
    assert_eq!(
        m.activations().len(),
        1,
        "nothing but the first version was activated"
    );

    // Properly signed again: applied.
    let good = bento::protocol::signing::Signer::load(&key).unwrap();
    fs::write(
        bento::protocol::layout::signature(&sshd.host_dir("alpha"), &v2),
        good.sign(&bytes).unwrap(),
    )
    .unwrap();
    let out = m.update_with(&[], &["--force"]);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));

    // A replay: the server offers the older, validly signed version 1 again.
    fs::write(
        sshd.host_dir("alpha").join("current"),
        bento::protocol::layout::current_text(&v1),
    )
    .unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    assert!(
        m.latest_report().error.unwrap().contains("replayed"),
        "{:?}",
        m.latest_report()
    );
    assert!(
        m.profile_target().unwrap().contains("-alpha-2"),
        "still on version 2"
    );
}

#[test]
fn server_check_warns_about_unsigned_hosts() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let check = || {
        let out = bento()
            .args(["server", "check", "--fleet"])
            .arg(sshd.fleet())
            .arg("--sshd-config")
            .arg(sshd.config())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = check();
    assert!(err.contains("manifests are not signed"), "{err}");
    assert!(err.contains("alpha: live version"), "{err}");

    let key = sshd.dir.join("signing/key");
    keygen(&key);
    set_signing_key(&sshd, &key);
    sshd.publish();
    let err = check();
    assert!(
        !err.contains("unsigned") && !err.contains("not signed"),
        "{err}"
    );
}
