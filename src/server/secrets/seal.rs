//! Sealing a host's `files` entries at publish, under the publish lock. A `.age` file is
//! shipped as it is (checked to be an age file for the host's key) and installs at its
//! target without the suffix; with `[secrets] encrypt = true` a plaintext entry is
//! encrypted to the host's key and the recipients. age output is random, so the ciphertext
//! is cached by (plaintext digest, recipient set) in `.bento/secrets-cache.json`: an
//! unchanged tree reuses the pooled ciphertext and publishes as "unchanged", while a new
//! host key or recipient list gives a new cache key and so a fresh encryption.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{host_recipient, recipients_for, EncryptMode, SecretsError};
use crate::protocol::layout::Chroot;
use crate::protocol::manifest::{Digest, FileEntry, Manifest, TargetPath};
use crate::protocol::secret::{self, Encryption, AGE_SUFFIX};
use crate::protocol::HostName;
use crate::server::fleet::FleetConfig;
use crate::server::hostfiles::Source;

/// One host's manifest and the sources of its objects, as publish planned them (publish's
/// `HostPlan`; taken apart so this module does not import publish, which calls it).
pub struct Sealable<'a> {
    pub manifest: &'a mut Manifest,
    pub sources: &'a mut crate::server::hostfiles::Sources,
}

/// The ciphertext cache, in the chroot's private state directory.
pub const CACHE_FILE: &str = "secrets-cache.json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Cache {
    /// sha256(recipients, plaintext digest) → ciphertext digest (an object in the pool).
    entries: BTreeMap<String, Digest>,
}

fn cache_key(plain: &Digest, recipients: &[secret::Recipient]) -> String {
    let mut texts: Vec<&str> = recipients.iter().map(|r| r.text.as_str()).collect();
    texts.sort_unstable();
    let mut input = b"bento-seal-v1\n".to_vec();
    for t in texts {
        input.extend_from_slice(t.as_bytes());
        input.push(b'\n');
    }
    input.extend_from_slice(plain.to_hex().as_bytes());
    Digest::of(&input).to_hex()
}

/// Seals every plan's `files` entries per `[secrets]`. Refuses, naming host and file, a
/// `.age` file that is not age or not for the host's key, a plaintext entry under
/// `encrypt = "required"`, and `encrypt = true` for a host without a key.
pub fn seal<'a>(
    fleet: &FleetConfig,
    chroot: &Chroot,
    plans: impl IntoIterator<Item = Sealable<'a>>,
) -> Result<Vec<(HostName, SecretsError)>, SecretsError> {
    seal_as(fleet, chroot, plans, Writes::Keep)
}

/// Whether sealing keeps what it made: `Keep` (publish: the ciphertext cache and copies,
/// so an unchanged secret keeps its digest) or `None` (`publish --dry-run`: what it
/// encrypts is dropped, so a secret never sealed before shows as changed, as it would be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    Keep,
    None,
}

/// [`seal`], writing nothing into the publisher's state when `writes` is `Writes::None`.
pub fn seal_as<'a>(
    fleet: &FleetConfig,
    chroot: &Chroot,
    plans: impl IntoIterator<Item = Sealable<'a>>,
    writes: Writes,
) -> Result<Vec<(HostName, SecretsError)>, SecretsError> {
    let mut plans: Vec<Sealable<'a>> = plans.into_iter().collect();
    let any_age = plans.iter().any(|p| {
        p.manifest
            .files
            .iter()
            .any(|f| f.path.as_str().ends_with(AGE_SUFFIX))
    });
    if fleet.secrets.encrypt == EncryptMode::Off && !any_age {
        return Ok(Vec::new()); // nothing to do: the manifests stay exactly as before
    }
    let cache_path = chroot.state_dir().join(CACHE_FILE);
    let mut cache: Cache = std::fs::read(&cache_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut used = BTreeSet::new();
    // A host whose secrets cannot be sealed fails alone, like any other per-host error.
    let mut failed = Vec::new();
    for plan in &mut plans {
        match seal_host(fleet, chroot, plan, &mut cache, &mut used, writes) {
            Ok(()) => plan.manifest.canonicalize(),
            Err(e) => failed.push((plan.manifest.host.clone(), e)),
        }
    }
    if writes == Writes::Keep
        && fleet.secrets.encrypt == EncryptMode::OnPublish
        && failed.len() < plans.len()
    {
        // Keep what this run used and what the pool still holds; forget the rest.
        let pool = chroot.pool_dir();
        cache
            .entries
            .retain(|k, d| used.contains(k) || pool.join(d.to_hex()).exists());
        // The publisher's copies no cache entry names any more go.
        let named: BTreeSet<String> = cache.entries.values().map(|d| d.to_hex()).collect();
        if let Ok(entries) = std::fs::read_dir(sealed_dir(chroot)) {
            for e in entries.flatten() {
                if !named.contains(&*e.file_name().to_string_lossy()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let bytes = serde_json::to_vec(&cache).expect("cache serialises");
        crate::sys::atomic::write_file(&cache_path, &bytes, 0o600).map_err(|source| {
            SecretsError::Io {
                path: cache_path.clone(),
                source,
            }
        })?;
    }
    Ok(failed)
}

fn source_path(plan: &Sealable<'_>, f: &FileEntry) -> PathBuf {
    plan.sources
        .get(&f.sha256)
        .map(Source::describe)
        .unwrap_or_else(|| PathBuf::from(f.path.as_str()))
}

fn seal_host(
    fleet: &FleetConfig,
    chroot: &Chroot,
    plan: &mut Sealable<'_>,
    cache: &mut Cache,
    used: &mut BTreeSet<String>,
    writes: Writes,
) -> Result<(), SecretsError> {
    let host = plan.manifest.host.clone();
    let host_key = host_recipient(fleet, &host)?;
    let mut files = std::mem::take(&mut plan.manifest.files);
    let mut recipients = None;
    for f in &mut files {
        let file = source_path(plan, f);
        if f.path.as_str().ends_with(AGE_SUFFIX) {
            let bytes = std::fs::read(&file).map_err(|source| SecretsError::Io {
                path: file.clone(),
                source,
            })?;
            if Digest::of(&bytes) != f.sha256 {
                return Err(SecretsError::Changed { file });
            }
            let stanzas = secret::stanzas(&bytes).map_err(|source| SecretsError::NotAge {
                file: file.clone(),
                host: host.clone(),
                source,
            })?;
            if let Some(key) = &host_key {
                if !secret::is_for(&stanzas, key) {
                    return Err(SecretsError::NotForHost { file, host });
                }
            }
            f.target = strip_suffix(&f.target).ok_or_else(|| SecretsError::BadTarget {
                file: file.clone(),
                host: host.clone(),
            })?;
            f.encrypted = Some(Encryption::Age);
            continue;
        }
        match fleet.secrets.encrypt {
            EncryptMode::Off => {}
            EncryptMode::Required => {
                return Err(SecretsError::Plaintext {
                    file,
                    host,
                    path: f.path.to_string(),
                })
            }
            EncryptMode::OnPublish => {
                let recipients = match &recipients {
                    Some(r) => r,
                    None => recipients.insert(recipients_for(fleet, &host)?),
                };
                let key = cache_key(&f.sha256, recipients);
                let pooled = cache.entries.get(&key).and_then(|d| {
                    // The chroot's pool, else the publisher's own copy (an object store).
                    [chroot.pool_dir(), sealed_dir(chroot)]
                        .into_iter()
                        .map(|dir| dir.join(d.to_hex()))
                        .find_map(|p| std::fs::metadata(&p).ok().map(|m| (*d, p, m.len())))
                });
                let (digest, size, source) = match pooled {
                    Some((digest, path, size)) => (digest, size, Source::File(Arc::from(path))),
                    None => {
                        let ct = encrypt_file(&file, &f.sha256, recipients, &host)?;
                        let digest = Digest::of(&ct);
                        if writes == Writes::Keep {
                            keep_sealed(chroot, &digest, &ct);
                        }
                        (digest, ct.len() as u64, Source::Bytes(ct.into()))
                    }
                };
                cache.entries.insert(key.clone(), digest);
                used.insert(key);
                plan.sources.insert(digest, source);
                f.sha256 = digest;
                f.size = size;
                f.encrypted = Some(Encryption::Age);
            }
        }
    }
    // Dropping `.age` may make two entries share a target.
    let mut targets: BTreeMap<&str, &str> = BTreeMap::new();
    for f in &files {
        if let Some(first) = targets.insert(f.target.as_str(), f.path.as_str()) {
            return Err(SecretsError::SameTarget {
                host,
                target: f.target.to_string(),
                first: first.to_owned(),
                second: f.path.to_string(),
            });
        }
    }
    plan.manifest.files = files;
    Ok(())
}

/// The publisher's own copies of the ciphertexts it made, so a store without a local pool
/// (an object store) reuses them and an unchanged secret keeps its digest.
fn sealed_dir(chroot: &Chroot) -> PathBuf {
    chroot.state_dir().join("sealed")
}

/// Keeps `ct` as `digest` in [`sealed_dir`] (best effort: a lost copy costs a new version).
fn keep_sealed(chroot: &Chroot, digest: &Digest, ct: &[u8]) {
    use std::os::unix::fs::DirBuilderExt;
    let dir = sealed_dir(chroot);
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    if made.is_ok() {
        let _ = crate::sys::atomic::write_file(&dir.join(digest.to_hex()), ct, 0o600);
    }
}

/// `/etc/x.age` → `/etc/x`; a target without the suffix (set in files.toml) is kept.
fn strip_suffix(target: &TargetPath) -> Option<TargetPath> {
    match target.as_str().strip_suffix(AGE_SUFFIX) {
        Some(stripped) => TargetPath::new(stripped)
            .ok()
            .filter(|t| !t.as_str().ends_with('/')),
        None => Some(target.clone()),
    }
}

fn encrypt_file(
    file: &Path,
    expected: &Digest,
    recipients: &[secret::Recipient],
    host: &HostName,
) -> Result<Vec<u8>, SecretsError> {
    let plain = std::fs::read(file).map_err(|source| SecretsError::Io {
        path: file.to_owned(),
        source,
    })?;
    if Digest::of(&plain) != *expected {
        return Err(SecretsError::Changed {
            file: file.to_owned(),
        });
    }
    secret::encrypt(&plain, recipients, false).map_err(|source| SecretsError::Encrypt {
        file: file.to_owned(),
        host: host.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::manifest::{Build, Mode, RelPath, FORMAT};
    use crate::protocol::secret::tests::keypair;
    use crate::protocol::secret::Identities;

    #[derive(Debug, Clone)]
    struct Plan {
        manifest: Manifest,
        sources: crate::server::hostfiles::Sources,
    }

    fn sealed(
        fleet: &FleetConfig,
        chroot: &Chroot,
        mut p: Plan,
    ) -> Result<Vec<Plan>, SecretsError> {
        let failed = seal(
            fleet,
            chroot,
            [Sealable {
                manifest: &mut p.manifest,
                sources: &mut p.sources,
            }],
        )?;
        if let Some((_, e)) = failed.into_iter().next() {
            return Err(e);
        }
        Ok(vec![p])
    }

    fn plan_with(dir: &Path, host: &str, files: &[(&str, &[u8])]) -> Plan {
        let mut sources = crate::server::hostfiles::Sources::default();
        let mut entries = Vec::new();
        for (rel, content) in files {
            let p = dir.join(rel.replace('/', "_"));
            std::fs::write(&p, content).unwrap();
            let d = Digest::of(content);
            sources.insert(d, Source::File(Arc::from(p.as_path())));
            entries.push(FileEntry {
                path: RelPath::new(rel).unwrap(),
                target: TargetPath::new(&format!("/{rel}")).unwrap(),
                size: content.len() as u64,
                sha256: d,
                owner: "root".into(),
                group: "root".into(),
                mode: Mode(0o600),
                encrypted: None,
            });
        }
        let mut manifest = Manifest {
            format: FORMAT,
            host: HostName::new(host).unwrap(),
            created: "2026-11-25T12:00:00Z".parse().unwrap(),
            serial: 0,
            source_commit: None,
            dirty: false,
            build: Build::Classic,
            system: None,
            config: vec![],
            tree: None,
            files: entries,
        };
        manifest.canonicalize();
        Plan { manifest, sources }
    }

    fn fleet(text: &str) -> FleetConfig {
        FleetConfig::parse(text, Path::new("bento.toml")).unwrap()
    }

    #[test]
    fn off_without_age_files_leaves_the_manifest_alone() {
        let t = tempfile::tempdir().unwrap();
        let chroot = Chroot::new(t.path().join("chroot"));
        let p = plan_with(t.path(), "a", &[("etc/s", b"plain")]);
        let before = p.manifest.to_bytes();
        let out = sealed(&fleet("[hosts.a]\n"), &chroot, p).unwrap();
        assert_eq!(out[0].manifest.to_bytes(), before);
        assert!(!String::from_utf8(before).unwrap().contains("encrypted"));
    }

    #[test]
    fn plaintext_is_encrypted_to_the_host_and_cached() {
        let t = tempfile::tempdir().unwrap();
        let (a_key, a_pub) = keypair(t.path(), "a");
        let (admin_key, admin_pub) = keypair(t.path(), "admin");
        let (b_key, _) = keypair(t.path(), "b");
        let chroot = Chroot::new(t.path().join("chroot"));
        std::fs::create_dir_all(chroot.pool_dir()).unwrap();
        let cfg = fleet(&format!(
            "[secrets]\nencrypt = true\nrecipients = [\"{admin_pub}\"]\n[hosts.a]\nkey = \"{a_pub}\"\n"
        ));
        let p = plan_with(t.path(), "a", &[("etc/s", b"the-plaintext")]);
        let out = sealed(&cfg, &chroot, p.clone()).unwrap();
        let f = &out[0].manifest.files[0];
        assert_eq!(f.encrypted, Some(Encryption::Age));
        assert_ne!(f.sha256, Digest::of(b"the-plaintext"));
        let Some(Source::Bytes(ct)) = out[0].sources.get(&f.sha256) else {
            panic!("ciphertext source")
        };
        for (key, ok) in [(&a_key, true), (&admin_key, true), (&b_key, false)] {
            let got = Identities::load(key).unwrap().decrypt(ct);
            assert_eq!(got.ok().as_deref() == Some(&b"the-plaintext"[..]), ok);
        }
        // Once pooled, the same plaintext and recipients reuse the ciphertext.
        std::fs::write(chroot.pool_dir().join(f.sha256.to_hex()), ct).unwrap();
        let again = sealed(&cfg, &chroot, p.clone()).unwrap();
        assert_eq!(again[0].manifest, out[0].manifest);
        // Another host key: a new ciphertext.
        let (_, new_pub) = keypair(t.path(), "a2");
        let cfg2 = fleet(&format!(
            "[secrets]\nencrypt = true\nrecipients = [\"{admin_pub}\"]\n[hosts.a]\nkey = \"{new_pub}\"\n"
        ));
        let rekeyed = sealed(&cfg2, &chroot, p).unwrap();
        assert_ne!(rekeyed[0].manifest.files[0].sha256, f.sha256);
    }

    #[test]
    fn age_files_ship_as_they_are_and_must_be_for_the_host() {
        let t = tempfile::tempdir().unwrap();
        let (_, a_pub) = keypair(t.path(), "a");
        let (_, b_pub) = keypair(t.path(), "b");
        let chroot = Chroot::new(t.path().join("chroot"));
        let a = secret::Recipient::parse(&a_pub).unwrap();
        let ct = secret::encrypt(b"x", &[a], true).unwrap();
        let cfg = fleet(&format!(
            "[hosts.a]\nkey = \"{a_pub}\"\n[hosts.b]\nkey = \"{b_pub}\"\n"
        ));
        let out = sealed(
            &cfg,
            &chroot,
            plan_with(t.path(), "a", &[("etc/k.age", &ct)]),
        )
        .unwrap();
        let f = &out[0].manifest.files[0];
        assert_eq!(f.target.as_str(), "/etc/k");
        assert_eq!(f.sha256, Digest::of(&ct));
        assert!(String::from_utf8(out[0].manifest.to_bytes())
            .unwrap()
            .contains(r#""mode":"0600","encrypted":"age"}"#));

        let err = sealed(
            &cfg,
            &chroot,
            plan_with(t.path(), "b", &[("etc/k.age", &ct)]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("not encrypted to host b's key") && err.contains("etc_k.age"),
            "{err}"
        );
        let err = sealed(
            &cfg,
            &chroot,
            plan_with(t.path(), "a", &[("etc/k.age", b"plain")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("not an age file") && err.contains("host a"),
            "{err}"
        );
        let both = plan_with(t.path(), "a", &[("etc/k.age", &ct), ("etc/k", b"p")]);
        let err = sealed(&cfg, &chroot, both).unwrap_err().to_string();
        assert!(err.contains("two files install to /etc/k"), "{err}");
    }

    #[test]
    fn required_refuses_plaintext_and_on_needs_a_key() {
        let t = tempfile::tempdir().unwrap();
        let chroot = Chroot::new(t.path().join("chroot"));
        let p = plan_with(t.path(), "a", &[("etc/s", b"plain")]);
        let err = sealed(
            &fleet("[secrets]\nencrypt = \"required\"\n[hosts.a]\n"),
            &chroot,
            p.clone(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("required") && err.contains("etc_s") && err.contains("host a"),
            "{err}"
        );
        let err = sealed(&fleet("[secrets]\nencrypt = true\n[hosts.a]\n"), &chroot, p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("host a has no `key`"), "{err}");
    }
}
