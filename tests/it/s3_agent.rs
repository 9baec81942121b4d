//! The real agent over `s3://`: a toy fleet published into a chroot the usual way, the
//! host's directory copied into SeaweedFS under `hosts/<host>/` by an admin, and
//! `bento agent update` run with only the host's credentials (read and list its prefix,
//! write its `logs/`): it applies the version, reports under `logs/`, a no-change poll
//! changes nothing, a lagging engine (a key `current` names missing) is retried on the next
//! run without a failure, and a tampered object is refused with nothing applied.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bento::protocol::report::{Heartbeat, Outcome, Report};
use bento::sys::s3::{Client, Credentials, Got, PutMode};

use crate::agent::{
    code, fleet, text, write_version, Machine, EXIT_FAILED, EXIT_NOOP, EXIT_UPDATED,
};
use crate::common::engines::{Identity, SeaweedFs};
use crate::common::sshd::Sshd;

pub(crate) const BUCKET: &str = "fleet";

/// Copies the host's chroot directory (everything but `logs/`) under `prefix`: objects and
/// `cache/` first, then manifests, `current` last, as publish orders them.
pub(crate) fn upload(admin: &Client, dir: &Path, prefix: &str) -> Vec<String> {
    let mut files = Vec::new();
    walk(dir, dir, &mut files);
    files.retain(|rel| !rel.starts_with("logs/"));
    let rank = |rel: &str| match rel.split('/').next() {
        Some("objects") | Some("cache") => 0,
        Some("manifests") => 1,
        _ if rel == "current" => 3,
        _ => 2,
    };
    files.sort_by_key(|r| (rank(r), r.clone()));
    for rel in &files {
        let bytes = fs::read(dir.join(rel)).unwrap();
        admin
            .put(
                BUCKET,
                &format!("{prefix}/{rel}"),
                &bytes,
                PutMode::Overwrite,
            )
            .unwrap();
    }
    files
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            walk(root, &p, out);
        } else if e.file_type().unwrap().is_file() {
            out.push(p.strip_prefix(root).unwrap().display().to_string());
        }
    }
}

fn read(admin: &Client, key: &str) -> Option<Vec<u8>> {
    match admin.get(BUCKET, key, 16 << 20, None).unwrap() {
        Got::Body { bytes, .. } => Some(bytes),
        _ => None,
    }
}

/// Writes the host's credentials file, root-owned 0600 as the agent demands.
pub(crate) fn credentials_file(path: &Path, c: &Credentials) {
    fs::write(
        path,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            c.access_key, c.secret_key
        ),
    )
    .unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// agent.toml pointing at the engine instead of sshd.
pub(crate) fn s3_config(m: &Machine<'_>, endpoint: &str, creds: &Path, extra: &str) {
    let base = m.base.display();
    fs::write(
        m.config(),
        format!(
            "host = \"{host}\"\nserver = \"s3://{BUCKET}/hosts/{{host}}?endpoint={endpoint}&region=us-east-1\"\ncredentials_file = \"{creds}\"\nstate_dir = \"{base}/state\"\nprofile = \"{base}/profiles/system\"\ncurrent_system = \"{base}/no-current-system\"\nfiles_root = \"{base}/root\"\nconnect_timeout = \"5s\"\nconfirm_timeout = \"10s\"\nstall_timeout = \"20s\"\n{extra}",
            host = m.host,
            creds = creds.display(),
        ),
    )
    .unwrap();
}

#[test]
fn s3_agent_applies_reports_and_refuses_a_tampered_object_on_seaweedfs() {
    let sshd = Sshd::start(&["alpha"]);
    fleet(&sshd);
    let alpha = Identity::host(BUCKET, "alpha");
    let engine = SeaweedFs::start(BUCKET, std::slice::from_ref(&alpha), None);
    let admin = engine.admin_client();
    upload(&admin, &sshd.host_dir("alpha"), "hosts/alpha");

    let m = Machine::new(&sshd, "alpha", "");
    let creds = m.base.join("s3-credentials");
    credentials_file(&creds, &alpha.creds);
    s3_config(&m, &engine.endpoint, &creds, "");

    // A credentials file others can read is refused before any request, naming it.
    fs::set_permissions(&creds, fs::Permissions::from_mode(0o644)).unwrap();
    let out = m.update();
    assert_ne!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("s3-credentials"),
        "{}",
        text(&out)
    );
    fs::set_permissions(&creds, fs::Permissions::from_mode(0o600)).unwrap();

    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    let system = m.profile_target().expect("profile points at the build");
    assert!(system.contains("nixos-system-alpha-1"), "{system}");
    assert_eq!(m.activations(), [format!("switch {system}")]);
    let report =
        Report::parse(&read(&admin, "hosts/alpha/logs/latest.json").expect("latest.json")).unwrap();
    assert_eq!(report.outcome, Outcome::Success);
    assert_eq!(report.system_after.as_deref(), Some(system.as_str()));
    assert!(read(&admin, &format!("hosts/alpha/logs/{}", report.file_name())).is_some());
    assert!(read(
        &admin,
        &format!("hosts/alpha/logs/{}", report.log_file_name())
    )
    .is_some());
    let hb = Heartbeat::parse(&read(&admin, "hosts/alpha/logs/heartbeat.json").unwrap()).unwrap();
    assert_eq!(hb.version, Some(report.version));

    // No change: nothing applied, the heartbeat rewritten.
    admin
        .delete(BUCKET, "hosts/alpha/logs/heartbeat.json")
        .unwrap();
    let out = m.update();
    assert_eq!(code(&out), EXIT_NOOP, "{}", text(&out));
    assert_eq!(m.activations().len(), 1);
    assert!(read(&admin, "hosts/alpha/logs/heartbeat.json").is_some());

    // A lagging replica: `current` names version 2 but its new objects are not there yet.
    // Not a failed update: no report, nothing applied, and the next run applies it.
    let keys = |admin: &Client| -> Vec<String> {
        admin
            .list(BUCKET, "hosts/alpha/objects/")
            .unwrap()
            .into_iter()
            .map(|l| l.key)
            .collect()
    };
    let before = keys(&admin);
    write_version(&sshd, "2");
    sshd.publish();
    upload(&admin, &sshd.host_dir("alpha"), "hosts/alpha");
    let added: Vec<String> = keys(&admin)
        .into_iter()
        .filter(|k| !before.contains(k))
        .collect();
    assert!(!added.is_empty(), "version 2 adds an object");
    for key in &added {
        admin.delete(BUCKET, key).unwrap();
    }
    let out = m.update();
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such file"),
        "{}",
        text(&out)
    );
    assert_eq!(m.activations().len(), 1, "nothing applied");
    let latest = Report::parse(&read(&admin, "hosts/alpha/logs/latest.json").unwrap()).unwrap();
    assert_eq!(latest.id, report.id, "no report for a lagging engine");
    upload(&admin, &sshd.host_dir("alpha"), "hosts/alpha");
    let out = m.update();
    assert_eq!(code(&out), EXIT_UPDATED, "{}", text(&out));
    assert_eq!(m.activations().len(), 2);
    let system = m.profile_target().unwrap();

    // A new version whose changed object is tampered with in the bucket: refused, nothing
    // applied, the failure reported.
    let before = keys(&admin);
    write_version(&sshd, "3");
    sshd.publish();
    upload(&admin, &sshd.host_dir("alpha"), "hosts/alpha");
    let added: Vec<String> = keys(&admin)
        .into_iter()
        .filter(|k| !before.contains(k))
        .collect();
    assert!(!added.is_empty(), "version 3 adds an object");
    for key in &added {
        let mut bytes = read(&admin, key).unwrap();
        bytes.extend_from_slice(b"\n# tampered\n");
        admin.put(BUCKET, key, &bytes, PutMode::Overwrite).unwrap();
    }
    let out = m.update();
    assert_eq!(code(&out), EXIT_FAILED, "{}", text(&out));
    assert_eq!(m.activations().len(), 2, "nothing applied");
    assert_eq!(m.profile_target().as_deref(), Some(system.as_str()));
    let failed = Report::parse(&read(&admin, "hosts/alpha/logs/latest.json").unwrap()).unwrap();
    assert_eq!(failed.outcome, Outcome::Failure);
    assert!(
        failed.error.as_deref().unwrap_or("").contains("hashes to"),
        "{failed:?}"
    );
}
