//! Secrets encrypted at rest, end to end over the real sshd and Nix: what publish leaves on
//! the server in each `[secrets]` mode, what the host installs, rekeying after a host key
//! change, `bento secret edit|show`, and interop both ways with Debian's `age` CLI.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::agent::{code, fleet, text, write_version, Machine, EXIT_FAILED, EXIT_UPDATED};
use crate::common::bento;
use crate::common::sshd::Sshd;

const AGE: &str = "/usr/bin/age";

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn append_toml(sshd: &Sshd, text: &str) {
    let path = sshd.fleet().join("bento.toml");
    let mut toml = fs::read_to_string(&path).unwrap();
    toml.push_str(text);
    fs::write(path, toml).unwrap();
}

fn publish(sshd: &Sshd) -> Output {
    bento()
        .args(["publish", "--fleet"])
        .arg(sshd.fleet())
        .arg("--chroot")
        .arg(sshd.chroot())
        .output()
        .unwrap()
}

fn current(sshd: &Sshd, host: &str) -> String {
    fs::read_to_string(sshd.host_dir(host).join("current")).unwrap()
}

/// A fresh ed25519 key pair in `dir`: (private key path, public key line).
pub(crate) fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let public = fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().to_owned())
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                let bytes = fs::read(&p).unwrap();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(p);
                }
            }
        }
    }
    found
}

/// The object a host's live manifest installs at `target`, and its manifest entry.
fn live_object(sshd: &Sshd, host: &str, target: &str) -> (PathBuf, serde_json::Value) {
    let digest = current(sshd, host);
    let dir = sshd.host_dir(host);
    let m: serde_json::Value = serde_json::from_slice(
        &fs::read(dir.join(format!("manifests/{}.json", digest.trim()))).unwrap(),
    )
    .unwrap();
    let entry = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["target"] == target)
        .unwrap_or_else(|| panic!("no files entry for {target}: {m}"))
        .clone();
    let object = dir.join("objects").join(entry["sha256"].as_str().unwrap());
    (object, entry)
}

/// `age -d -i KEY FILE`: the plaintext, or None when the key cannot decrypt it.
fn age_decrypt(key: &Path, file: &Path) -> Option<Vec<u8>> {
    let out = Command::new(AGE)
        .arg("-d")
        .arg("-i")
        .arg(key)
        .arg(file)
        .output()
        .unwrap();
    out.status.success().then_some(out.stdout)
}

fn secret_path(m: &Machine<'_>, rel: &str) -> PathBuf {
    m.base.join("root").join(rel)
}

#[test]
fn encrypted_publish_leaves_no_plaintext_on_the_server_and_the_host_installs_it() {
    let sshd = Sshd::start(&["alpha", "beta"]);
    let (admin, admin_pub) = keypair(&sshd.dir.path, "admin");
    append_toml(
        &sshd,
        &format!("\n[secrets]\nencrypt = true\nrecipients = [\"{admin_pub}\"]\n"),
    );
    let marker = |h: &str, v: &str| format!("MARKER-{h}-{v}-{}\n", sshd.prefix);
    for h in ["alpha", "beta"] {
        fs::write(
            sshd.fleet()
                .join(format!("hosts/{h}/files/etc/bento-it/secret")),
            marker(h, "v1"),
        )
        .unwrap();
    }
    fleet(&sshd); // publishes, encrypting

    let markers = ["alpha", "beta"].map(|h| marker(h, "v1"));
    for mk in &markers {
        let found = files_containing(&sshd.chroot(), mk.trim().as_bytes());
        assert!(
            found.is_empty(),
            "plaintext {mk:?} on the server: {found:?}"
        );
    }
    let (object, entry) = live_object(&sshd, "alpha", "/etc/bento-it/secret");
    assert_eq!(entry["encrypted"], "age", "{entry}");

    // Interop: the age CLI decrypts what bento made, with the host's and the admin's keys;
    // another host's key cannot.
    let want = marker("alpha", "v1").into_bytes();
    assert_eq!(
        age_decrypt(&sshd.client_key("alpha"), &object),
        Some(want.clone())
    );
    assert_eq!(age_decrypt(&admin, &object), Some(want.clone()));
    assert_eq!(age_decrypt(&sshd.client_key("beta"), &object), None);

    // The host installs the plaintext with files.toml's mode.
    let m = Machine::new(&sshd, "alpha", "");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let installed = secret_path(&m, "etc/bento-it/secret");
    assert_eq!(fs::read(&installed).unwrap(), want);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(&installed).unwrap().mode() & 0o7777, 0o640);

    // Publishing the unchanged tree again is "unchanged": no new version for anyone.
    let before = (current(&sshd, "alpha"), current(&sshd, "beta"));
    ok(publish(&sshd));
    assert_eq!((current(&sshd, "alpha"), current(&sshd, "beta")), before);

    // A new secret with a new system whose activation fails: the previous plaintext is back.
    fs::write(
        sshd.fleet()
            .join("hosts/alpha/files/alpha/etc/bento-it/secret"),
        marker("alpha", "v2"),
    )
    .unwrap();
    write_version(&sshd, "2");
    ok(publish(&sshd));
    assert_ne!(current(&sshd, "alpha"), before.0);
    assert!(files_containing(&sshd.chroot(), marker("alpha", "v2").trim().as_bytes()).is_empty());
    let out = m.update_with(&[("BENTO_TEST_FAIL_ACTIVATION", "1")], &[]);
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    assert_eq!(
        fs::read(&installed).unwrap(),
        want,
        "rollback restored the old plaintext"
    );
    let out = m.update_with(&[], &["--force"]);
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert_eq!(
        fs::read(&installed).unwrap(),
        marker("alpha", "v2").into_bytes()
    );
}

#[test]
fn age_files_from_the_cli_ship_as_is_and_rekey_follows_a_new_host_key() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd); // a plaintext secret, published in the clear
    let (admin, admin_pub) = keypair(&sshd.dir.path, "admin");
    append_toml(
        &sshd,
        &format!(
            "\n[secrets]\nencrypt = \"required\"\nrecipients = [\"{admin_pub}\"]\nidentity = \"{}\"\n",
            admin.display()
        ),
    );
    // `required`: the plaintext secret is refused, naming it.
    let out = publish(&sshd);
    assert!(!out.status.success());
    // The host fails alone (issue #24 item 8): its line in the summary says why.
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        err.contains("required") && err.contains("etc/bento-it/secret") && err.contains("alpha"),
        "{err}"
    );

    // Replace it with an armored age file made by the age CLI for alpha and the admin.
    let files = sshd.fleet().join("hosts/alpha/files/alpha");
    fs::remove_file(files.join("etc/bento-it/secret")).unwrap();
    fs::write(
        sshd.fleet().join("hosts/alpha/files.toml"),
        "[\"alpha/etc/bento-it/secret.age\"]\nmode = \"0640\"\n",
    )
    .unwrap();
    let plain = sshd.dir.join("plain");
    let token = format!("TOKEN-{}\n", sshd.prefix);
    fs::write(&plain, &token).unwrap();
    let recipients = sshd.dir.join("recipients");
    fs::write(
        &recipients,
        format!("{}\n{admin_pub}\n", sshd.public_key("alpha")),
    )
    .unwrap();
    let st = Command::new(AGE)
        .args(["-a", "-R"])
        .arg(&recipients)
        .arg("-o")
        .arg(files.join("etc/bento-it/secret.age"))
        .arg(&plain)
        .status()
        .unwrap();
    assert!(st.success());
    fs::remove_file(&plain).unwrap();
    ok(publish(&sshd));
    assert!(files_containing(&sshd.chroot(), token.trim().as_bytes()).is_empty());
    let m = Machine::new(&sshd, "alpha", "");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert_eq!(
        fs::read_to_string(secret_path(&m, "etc/bento-it/secret")).unwrap(),
        token
    );

    // `bento secret show` decrypts it with the admin's identity ([secrets] identity).
    let shown = ok(bento()
        .args(["secret", "show", "alpha", "etc/bento-it/secret", "--fleet"])
        .arg(sshd.fleet())
        .output()
        .unwrap());
    assert_eq!(shown, token);

    // Replace alpha's key: the machine gets a new identity, bento.toml the new public key.
    let old_key = sshd.dir.join("alpha-old-key");
    fs::copy(sshd.client_key("alpha"), &old_key).unwrap();
    let (new_key, new_pub) = keypair(&sshd.dir.path, "alpha-new");
    fs::rename(&new_key, sshd.client_key("alpha")).unwrap();
    fs::rename(
        new_key.with_extension("pub"),
        sshd.client_key("alpha").with_extension("pub"),
    )
    .unwrap();
    let toml = sshd.fleet().join("bento.toml");
    let text_before = fs::read_to_string(&toml).unwrap();
    let old_pub = text_before
        .lines()
        .find(|l| l.starts_with("key = "))
        .unwrap()
        .to_owned();
    fs::write(
        &toml,
        text_before.replace(&old_pub, &format!("key = \"{new_pub}\"")),
    )
    .unwrap();
    sshd.sync_accounts(false);

    // Publish refuses the stale file (alpha could not decrypt it) and says what to run.
    let out = publish(&sshd);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stdout);
    assert!(
        err.contains("secret.age") && err.contains("bento secret rekey"),
        "{err}"
    );

    let out = ok(bento()
        .args(["secret", "rekey", "--on", "al*", "--fleet"])
        .arg(sshd.fleet())
        .output()
        .unwrap());
    assert!(
        out.contains("rekeyed") && out.contains("secret.age"),
        "{out}"
    );
    let again = ok(bento()
        .args(["secret", "rekey", "--host", "alpha", "--fleet"])
        .arg(sshd.fleet())
        .output()
        .unwrap());
    assert!(again.contains("up to date"), "{again}");
    let repo_file = files.join("etc/bento-it/secret.age");
    assert!(fs::read_to_string(&repo_file)
        .unwrap()
        .starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
    // Interop the other way: the age CLI reads the file bento rewrote.
    assert_eq!(
        age_decrypt(&admin, &repo_file),
        Some(token.clone().into_bytes())
    );

    ok(publish(&sshd));
    let (object, _) = live_object(&sshd, "alpha", "/etc/bento-it/secret");
    assert_eq!(
        age_decrypt(&old_key, &object),
        None,
        "the old key no longer decrypts"
    );
    assert_eq!(
        age_decrypt(&sshd.client_key("alpha"), &object),
        Some(token.clone().into_bytes())
    );
    let out = m.update_with(&[], &["--force"]);
    assert!(matches!(code(&out), 0 | EXIT_UPDATED), "{}", text(&out));
    assert_eq!(
        fs::read_to_string(secret_path(&m, "etc/bento-it/secret")).unwrap(),
        token
    );
}

#[test]
fn a_host_refuses_a_secret_it_cannot_decrypt_and_changes_nothing() {
    let sshd = Sshd::start(&["alpha", "beta"]);
    fleet(&sshd); // plaintext secrets, no [secrets]
    let m = Machine::new(&sshd, "alpha", "");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let installed = secret_path(&m, "etc/bento-it/secret");
    let before = fs::read(&installed).unwrap();
    let profile = m.profile_target();

    // A new version with a file only beta can decrypt. bento.toml no longer names alpha's
    // key (its login still works), so publish cannot tell alpha will fail: the host must.
    let toml = sshd.fleet().join("bento.toml");
    let t = fs::read_to_string(&toml).unwrap();
    let alpha_key = format!("key = \"{}\"\n", sshd.public_key("alpha"));
    fs::write(&toml, t.replacen(&alpha_key, "", 1)).unwrap();
    let beta = sshd.dir.join("beta.pub");
    fs::write(&beta, format!("{}\n", sshd.public_key("beta"))).unwrap();
    let dir = sshd.fleet().join("hosts/alpha/files/alpha/etc/bento-it");
    let st = Command::new(AGE)
        .arg("-R")
        .arg(&beta)
        .arg("-o")
        .arg(dir.join("api.age"))
        .arg(dir.join("secret"))
        .status()
        .unwrap();
    assert!(st.success());
    fs::write(dir.join("secret"), "a new plaintext\n").unwrap();
    write_version(&sshd, "2");
    ok(publish(&sshd));

    let out = m.update();
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    let error = m.latest_report().error.unwrap_or_default();
    assert!(
        error.contains("/etc/bento-it/api") && error.contains("api.age"),
        "{error}"
    );
    assert_eq!(fs::read(&installed).unwrap(), before, "no file changed");
    assert!(!secret_path(&m, "etc/bento-it/api").exists());
    assert_eq!(m.profile_target(), profile, "no activation");
}

#[test]
fn secret_edit_encrypts_to_the_host_and_the_admins() {
    let sshd = Sshd::start(&["alpha"]);
    let (admin, admin_pub) = keypair(&sshd.dir.path, "admin");
    append_toml(
        &sshd,
        &format!("\n[secrets]\nrecipients = [\"{admin_pub}\"]\n"),
    );
    fleet(&sshd);
    let editor = sshd.dir.join("editor.sh");
    fs::write(&editor, "#!/bin/sh\nprintf 'edited:' >> \"$1\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&editor, fs::Permissions::from_mode(0o755)).unwrap();
    let edit = || {
        ok(bento()
            .args(["secret", "edit", "alpha", "etc/wg0.key", "--identity"])
            .arg(&admin)
            .arg("--fleet")
            .arg(sshd.fleet())
            .env("EDITOR", &editor)
            .env_remove("VISUAL")
            .output()
            .unwrap())
    };
    assert!(edit().contains("created hosts/alpha/files/alpha/etc/wg0.key.age"));
    assert!(edit().contains("encrypted"));
    let file = sshd.fleet().join("hosts/alpha/files/alpha/etc/wg0.key.age");
    assert_eq!(age_decrypt(&admin, &file), Some(b"edited:edited:".to_vec()));
    assert_eq!(
        age_decrypt(&sshd.client_key("alpha"), &file),
        Some(b"edited:edited:".to_vec())
    );

    // A failing editor writes nothing.
    let before = fs::read(&file).unwrap();
    let out = bento()
        .args(["secret", "edit", "alpha", "etc/wg0.key.age", "--identity"])
        .arg(&admin)
        .arg("--fleet")
        .arg(sshd.fleet())
        .env("EDITOR", "false")
        .env_remove("VISUAL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(fs::read(&file).unwrap(), before);

    // A binary age file as agenix and `age -R` make it: shown and installed too.
    let recipients = sshd.dir.join("recipients");
    fs::write(
        &recipients,
        format!("{}\n{admin_pub}\n", sshd.public_key("alpha")),
    )
    .unwrap();
    let plain = sshd.dir.join("plain");
    fs::write(&plain, b"agenix-made\n").unwrap();
    let binary = sshd.fleet().join("hosts/alpha/files/alpha/etc/agenix.age");
    let st = Command::new(AGE)
        .arg("-R")
        .arg(&recipients)
        .arg("-o")
        .arg(&binary)
        .arg(&plain)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!fs::read(&binary).unwrap().starts_with(b"-----BEGIN"));
    let shown = ok(bento()
        .args(["secret", "show", "alpha", "etc/agenix", "--identity"])
        .arg(&admin)
        .arg("--fleet")
        .arg(sshd.fleet())
        .output()
        .unwrap());
    assert_eq!(shown, "agenix-made\n");

    // The host gets them at /etc/wg0.key and /etc/agenix.
    ok(publish(&sshd));
    let m = Machine::new(&sshd, "alpha", "");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert_eq!(
        fs::read(secret_path(&m, "etc/wg0.key")).unwrap(),
        b"edited:edited:"
    );
}

/// Issue #24 item 11: `bento secret encrypt HOST PATH` turns a plaintext `files/` entry into
/// an `.age` file for the host (its files.toml owner, group and mode follow it), and the
/// host installs the same secret as before.
#[test]
fn secret_encrypt_turns_a_plaintext_entry_into_an_age_file() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let dir = sshd.fleet().join("hosts/alpha");
    let plain = dir.join("files/alpha/etc/bento-it/secret");
    let secret = fs::read(&plain).unwrap();
    let encrypt = || {
        bento()
            .args([
                "secret",
                "encrypt",
                "alpha",
                "etc/bento-it/secret",
                "--fleet",
            ])
            .arg(sshd.fleet())
            .output()
            .unwrap()
    };
    let out = ok(encrypt());
    assert!(
        out.contains("encrypted hosts/alpha/files/alpha/etc/bento-it/secret → hosts/alpha/files/alpha/etc/bento-it/secret.age (to alpha)"),
        "{out}"
    );
    let age = dir.join("files/alpha/etc/bento-it/secret.age");
    assert!(!plain.exists(), "the plaintext is still there");
    assert_eq!(
        age_decrypt(&sshd.client_key("alpha"), &age),
        Some(secret.clone())
    );
    let toml = fs::read_to_string(dir.join("files.toml")).unwrap();
    assert!(
        toml.contains("[\"alpha/etc/bento-it/secret.age\"]\nmode = \"0640\"\ngroup = \"daemon\""),
        "{toml}"
    );
    // Twice: refused, naming the file, and nothing changes.
    let before = fs::read(&age).unwrap();
    let out = encrypt();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("secret.age") && err.contains("already encrypted"),
        "{err}"
    );
    assert_eq!(fs::read(&age).unwrap(), before);

    // Published and installed as before: same bytes, same group and mode.
    ok(publish(&sshd));
    let m = Machine::new(&sshd, "alpha", "");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let installed = secret_path(&m, "etc/bento-it/secret");
    assert_eq!(fs::read(&installed).unwrap(), secret);
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(&installed).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!(
        meta.gid(),
        bento::sys::accounts::group("daemon").unwrap().unwrap()
    );
}
