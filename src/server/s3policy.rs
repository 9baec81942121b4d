//! `bento server s3-policy`: least privilege for an object store, stated and provisioned
//! (docs/objectstore.md). One identity per host with exactly: read and list on its own
//! prefix (or bucket), write on its own `logs/` (or its reports bucket); nothing else. The
//! engine's form is printed (SeaweedFS's `-s3.config` identities JSON, the `garage` commands,
//! or IAM policy JSON); each host's fresh keys are kept root-only in the publisher's state and
//! handed to the host as a credentials file sealed with age to its SSH key.
//!
//! Invariant: a host's rights never name another host's prefix or bucket, its `current`,
//! `manifests/`, `objects/` or `cache/` for writing; keys already made are reused, so running
//! it again changes no host's credentials.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use serde_json::json;

use crate::protocol::layout::{Chroot, LOGS};
use crate::protocol::secret::{self, Recipient};
use crate::protocol::HostName;
use crate::sys::atomic;
use crate::sys::s3::{Credentials, Location};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{at}: {source}")]
    Io { at: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Layout(String),
    #[error("{host}: cannot seal its credentials: {message}")]
    Seal { host: HostName, message: String },
}

/// Where one host's rights are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRights {
    pub host: HostName,
    /// Its files (read and list).
    pub files: Location,
    /// Its `logs/` (write): `[server] reports`, else `<files>/logs`.
    pub logs: Location,
}

/// Each host's locations under the `[server] store` (and `reports`) templates.
pub fn rights(
    files: &Location,
    reports: Option<&Location>,
    hosts: &[HostName],
) -> Result<Vec<HostRights>, PolicyError> {
    let bad = |e: crate::sys::s3::LocationError| PolicyError::Layout(e.to_string());
    hosts
        .iter()
        .map(|h| {
            let f = files.for_host(h.as_str()).map_err(bad)?;
            let logs = match reports {
                Some(r) => r.for_host(h.as_str()).map_err(bad)?,
                None => Location {
                    prefix: f.key(LOGS),
                    ..f.clone()
                },
            };
            Ok(HostRights {
                host: h.clone(),
                files: f,
                logs,
            })
        })
        .collect()
}

/// `bucket/prefix/*`, or `bucket/*` for a bucket's root.
fn resource(l: &Location) -> String {
    if l.prefix.is_empty() {
        format!("{}/*", l.bucket)
    } else {
        format!("{}/{}/*", l.bucket, l.prefix)
    }
}

/// SeaweedFS's `-s3.config`: the publisher's identity (every right) and one per host.
pub fn seaweedfs(
    rights: &[HostRights],
    keys: &BTreeMap<HostName, Credentials>,
    publisher: Option<&Credentials>,
) -> String {
    let mut identities = Vec::new();
    if let Some(p) = publisher {
        identities.push(json!({
            "name": "bento-publisher",
            "credentials": [{"accessKey": p.access_key, "secretKey": p.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }));
    }
    for r in rights {
        let Some(k) = keys.get(&r.host) else { continue };
        identities.push(json!({
            "name": format!("bento-{}", r.host),
            "credentials": [{"accessKey": k.access_key, "secretKey": k.secret_key}],
            "actions": [
                format!("Read:{}", resource(&r.files)),
                format!("List:{}", resource(&r.files)),
                format!("Write:{}", resource(&r.logs)),
            ],
        }));
    }
    let mut text = serde_json::to_string_pretty(&json!({ "identities": identities }))
        .expect("JSON of strings");
    text.push('\n');
    text
}

/// The `garage` commands: one bucket per host (read for its key), its reports bucket (write
/// for its key), each key imported with the fresh secret; the publisher's key (when known)
/// gets read, write and owner on them all.
pub fn garage(
    rights: &[HostRights],
    keys: &BTreeMap<HostName, Credentials>,
    publisher: Option<&Credentials>,
) -> String {
    let mut out = String::new();
    let publisher_allow = |out: &mut String, bucket: &str| {
        if let Some(p) = publisher {
            out.push_str(&format!(
                "garage bucket allow --read --write --owner {bucket} --key {}\n",
                p.access_key
            ));
        }
    };
    for r in rights {
        let Some(k) = keys.get(&r.host) else { continue };
        let name = format!("bento-{}", r.host);
        out.push_str(&format!(
            "garage key import --yes -n {name} {} {}\n",
            k.access_key, k.secret_key
        ));
        out.push_str(&format!("garage bucket create {}\n", r.files.bucket));
        publisher_allow(&mut out, &r.files.bucket);
        out.push_str(&format!(
            "garage bucket allow --read {} --key {name}\n",
            r.files.bucket
        ));
        if r.logs.bucket != r.files.bucket {
            out.push_str(&format!("garage bucket create {}\n", r.logs.bucket));
            publisher_allow(&mut out, &r.logs.bucket);
            out.push_str(&format!(
                "garage bucket allow --write {} --key {name}\n",
                r.logs.bucket
            ));
        } else {
            out.push_str(&format!(
                "# {}: Garage grants per bucket: writing its logs/ needs [server] reports = \"s3://…{{host}}…\" (a reports bucket per host)\n",
                r.host
            ));
        }
    }
    out
}

/// One IAM policy per host (attach each to the host's IAM user).
pub fn aws(rights: &[HostRights]) -> String {
    let mut policies = serde_json::Map::new();
    for r in rights {
        let list_condition = if r.files.prefix.is_empty() {
            json!({})
        } else {
            json!({"StringLike": {"s3:prefix": [format!("{}/*", r.files.prefix)]}})
        };
        policies.insert(
            format!("bento-{}", r.host),
            json!({
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": ["s3:GetObject"],
                     "Resource": [format!("arn:aws:s3:::{}", resource(&r.files))]},
                    {"Effect": "Allow", "Action": ["s3:ListBucket"],
                     "Resource": [format!("arn:aws:s3:::{}", r.files.bucket)],
                     "Condition": list_condition},
                    {"Effect": "Allow", "Action": ["s3:PutObject"],
                     "Resource": [format!("arn:aws:s3:::{}", resource(&r.logs))]},
                ],
            }),
        );
    }
    let mut text = serde_json::to_string_pretty(&policies).expect("JSON of strings");
    text.push('\n');
    text
}

/// The directory of the hosts' S3 keys in the publisher's state (root-only).
pub fn keys_dir(state: &Chroot) -> PathBuf {
    state.state_dir().join("s3-keys")
}

fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(hex::encode(buf))
}

/// Fresh keys in a form every engine accepts (Garage's: `GK` + 24 hex, 64 hex).
pub fn fresh_key() -> std::io::Result<Credentials> {
    Ok(Credentials {
        access_key: format!("GK{}", random_hex(12)?),
        secret_key: random_hex(32)?,
        session_token: None,
    })
}

/// The credentials file a host receives (AWS shared-credentials format).
pub fn credentials_text(c: &Credentials) -> String {
    format!(
        "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
        c.access_key, c.secret_key
    )
}

/// Each host's keys: the kept ones, fresh ones (kept root-only) for the others.
pub fn host_keys(
    state: &Chroot,
    hosts: &[HostName],
) -> Result<BTreeMap<HostName, Credentials>, PolicyError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = keys_dir(state);
    let io = |at: &std::path::Path| {
        let at = at.to_owned();
        move |source| PolicyError::Io { at, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io(&dir))?;
    let mut keys = BTreeMap::new();
    for h in hosts {
        let path = dir.join(h.as_str());
        let creds = match Credentials::load(&path) {
            Ok(c) => c,
            Err(_) if !path.exists() => {
                let c = fresh_key().map_err(io(&path))?;
                atomic::write_file(&path, credentials_text(&c).as_bytes(), 0o600)
                    .map_err(io(&path))?;
                c
            }
            Err(e) => return Err(PolicyError::Layout(e.to_string())),
        };
        keys.insert(h.clone(), creds);
    }
    Ok(keys)
}

/// The host's credentials file sealed (age, armored) to its SSH public key.
pub fn sealed_credentials(
    host: &HostName,
    ssh_key: &str,
    creds: &Credentials,
) -> Result<Vec<u8>, PolicyError> {
    let seal = |message: String| PolicyError::Seal {
        host: host.clone(),
        message,
    };
    let recipient = Recipient::parse(ssh_key.trim()).map_err(|e| seal(e.to_string()))?;
    secret::encrypt(credentials_text(creds).as_bytes(), &[recipient], true)
        .map_err(|e| seal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(n: &str) -> HostName {
        HostName::new(n).unwrap()
    }

    fn creds(n: &str) -> Credentials {
        Credentials {
            access_key: format!("AK{n}"),
            secret_key: format!("SK{n}"),
            session_token: None,
        }
    }

    #[test]
    fn seaweedfs_identities_grant_each_host_its_prefix_only() {
        let files: Location = "s3://fleet/hosts/{host}?endpoint=http://127.0.0.1:1"
            .parse()
            .unwrap();
        let r = rights(&files, None, &[host("alpha"), host("beta")]).unwrap();
        let keys = BTreeMap::from([(host("alpha"), creds("a")), (host("beta"), creds("b"))]);
        let text = seaweedfs(&r, &keys, None);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ids = v["identities"].as_array().unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(
            ids[0]["actions"],
            json!([
                "Read:fleet/hosts/alpha/*",
                "List:fleet/hosts/alpha/*",
                "Write:fleet/hosts/alpha/logs/*"
            ])
        );
        assert_eq!(ids[1]["credentials"][0]["accessKey"], "AKb");
        assert!(!ids[0].to_string().contains("beta"));
    }

    #[test]
    fn garage_gets_a_bucket_per_host_and_a_reports_bucket_to_write() {
        let files: Location = "s3://bento-{host}?endpoint=http://127.0.0.1:1&region=garage"
            .parse()
            .unwrap();
        let reports: Location = "s3://bento-reports-{host}?endpoint=http://127.0.0.1:1"
            .parse()
            .unwrap();
        let r = rights(&files, Some(&reports), &[host("alpha")]).unwrap();
        let keys = BTreeMap::from([(host("alpha"), creds("a"))]);
        let text = garage(&r, &keys, None);
        assert!(text.contains("garage bucket allow --read bento-alpha --key bento-alpha\n"));
        assert!(
            text.contains("garage bucket allow --write bento-reports-alpha --key bento-alpha\n")
        );
        assert!(!text.contains("--write bento-alpha "), "{text}");
        let aws = aws(&r);
        assert!(aws.contains("arn:aws:s3:::bento-reports-alpha/*"), "{aws}");
    }

    #[test]
    fn keys_are_made_once_root_only_and_sealed_to_the_host() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let state = Chroot::new(tmp.path());
        let first = host_keys(&state, &[host("alpha")]).unwrap();
        let again = host_keys(&state, &[host("alpha")]).unwrap();
        assert_eq!(first, again, "kept, not renewed");
        let k = &first[&host("alpha")];
        assert!(k.access_key.starts_with("GK") && k.access_key.len() == 26);
        assert_eq!(k.secret_key.len(), 64);
        let mode = std::fs::metadata(keys_dir(&state).join("alpha"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (private, public) = secret::tests::keypair(tmp.path(), "alpha-key");
        let sealed = sealed_credentials(&host("alpha"), &public, k).unwrap();
        assert!(secret::is_armored(&sealed));
        assert!(!String::from_utf8_lossy(&sealed).contains(&k.secret_key));
        let plain = secret::Identities::load(&private)
            .unwrap()
            .decrypt(&sealed)
            .unwrap();
        assert_eq!(
            Credentials::parse(std::str::from_utf8(&plain).unwrap(), &private).unwrap(),
            *k
        );
    }
}
