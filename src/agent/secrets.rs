//! Decrypting a version's encrypted `files` entries with the machine's `identity_file`,
//! all of them before a single file is written: a secret the machine cannot decrypt
//! fails the run with nothing on the machine changed, naming the file.

use std::path::{Path, PathBuf};

use crate::protocol::manifest::FileEntry;
use crate::protocol::secret::{Encryption, Identities};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("file {target} ({path}): cannot read the identity to decrypt it: {source}")]
    Identity {
        target: String,
        path: String,
        source: crate::protocol::secret::SecretError,
    },
    #[error("file {target} ({path}): cannot decrypt it with {identity}: {source}; nothing was installed")]
    Decrypt {
        target: String,
        path: String,
        identity: PathBuf,
        source: crate::protocol::secret::SecretError,
    },
    #[error("file {target} ({path}): {object}: {source}")]
    Read {
        target: String,
        path: String,
        object: PathBuf,
        source: std::io::Error,
    },
}

/// The plaintext of every encrypted entry of `files` (in order; `None` for entries stored
/// in the clear, which the installer reads from the object cache itself). The identity is
/// read only when some entry is encrypted.
pub fn open(
    files: &[FileEntry],
    objects: &Path,
    identity: &Path,
) -> Result<Vec<Option<Vec<u8>>>, SecretError> {
    let mut ids: Option<Identities> = None;
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let Some(Encryption::Age) = f.encrypted else {
            out.push(None);
            continue;
        };
        let target = f.target.to_string();
        let path = f.path.to_string();
        let ids =
            match &mut ids {
                Some(ids) => ids,
                None => ids.insert(Identities::load(identity).map_err(|source| {
                    SecretError::Identity {
                        target: target.clone(),
                        path: path.clone(),
                        source,
                    }
                })?),
            };
        let object = objects.join(f.sha256.to_hex());
        let bytes = std::fs::read(&object).map_err(|source| SecretError::Read {
            target: target.clone(),
            path: path.clone(),
            object: object.clone(),
            source,
        })?;
        let plain = ids.decrypt(&bytes).map_err(|source| SecretError::Decrypt {
            target,
            path,
            identity: identity.to_owned(),
            source,
        })?;
        out.push(Some(plain));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use crate::agent::files::install_files;
    use crate::protocol::manifest::{Digest, FileEntry, Mode, RelPath, TargetPath};
    use crate::protocol::secret::tests::keypair;
    use crate::protocol::secret::{encrypt, Encryption, Recipient};

    fn sealed(objects: &std::path::Path, target: &str, ct: &[u8]) -> FileEntry {
        fs::write(objects.join(Digest::of(ct).to_hex()), ct).unwrap();
        FileEntry {
            path: RelPath::new(&format!("{}.age", target.trim_start_matches('/'))).unwrap(),
            target: TargetPath::new(target).unwrap(),
            size: ct.len() as u64,
            sha256: Digest::of(ct),
            // Whoever runs the test (root, or `nobody` in the non-root unit tier): chown to
            // oneself needs no privilege.
            owner: crate::sys::accounts::euid().to_string(),
            group: crate::sys::accounts::egid().to_string(),
            mode: Mode(0o600),
            encrypted: Some(Encryption::Age),
        }
    }

    #[test]
    fn installs_the_plaintext_and_refuses_what_it_cannot_decrypt_before_writing() {
        let t = tempfile::tempdir().unwrap();
        let (mine, mine_pub) = keypair(t.path(), "mine");
        let (_, other_pub) = keypair(t.path(), "other");
        let objects = t.path().join("objects");
        let root = t.path().join("root");
        fs::create_dir_all(&objects).unwrap();
        fs::create_dir_all(&root).unwrap();
        let to =
            |k: &str, text: &[u8]| encrypt(text, &[Recipient::parse(k).unwrap()], false).unwrap();

        let good = sealed(&objects, "/etc/a", &to(&mine_pub, b"plain-a"));
        install_files(std::slice::from_ref(&good), &objects, &root, &[], &mine).unwrap();
        assert_eq!(fs::read(root.join("etc/a")).unwrap(), b"plain-a");

        // A second version: a new plaintext for /etc/a and a file for another key.
        let newer = sealed(&objects, "/etc/a", &to(&mine_pub, b"plain-a2"));
        let foreign = sealed(&objects, "/etc/z", &to(&other_pub, b"plain-z"));
        let err = install_files(
            &[newer, foreign],
            &objects,
            &root,
            &["/etc/a".into()],
            &mine,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/etc/z") && err.contains("etc/z.age"), "{err}");
        assert!(err.contains("not encrypted to this identity"), "{err}");
        assert_eq!(
            fs::read(root.join("etc/a")).unwrap(),
            b"plain-a",
            "nothing changed"
        );
        assert!(!root.join("etc/z").exists());
    }
}
