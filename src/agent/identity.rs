//! The machine's SSH key (`identity_file`): made once by `bento agent init`, never replaced,
//! private to root (0600, as ssh demands).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {message}")]
    Key { path: PathBuf, message: String },
}

/// The machine's public key line, making the key pair (`path`, `path.pub`) when there is
/// none. Returns the line and whether it was made now.
pub fn ensure(path: &Path, comment: &str) -> Result<(String, bool), IdentityError> {
    let err = |message: String| IdentityError::Key {
        path: path.to_owned(),
        message,
    };
    if path.exists() {
        let key = ssh_key::PrivateKey::read_openssh_file(path).map_err(|e| {
            err(format!(
                "exists but is not an OpenSSH private key ({e}); move it away to make a new one"
            ))
        })?;
        let line = key
            .public_key()
            .to_openssh()
            .map_err(|e| err(e.to_string()))?;
        return Ok((line, false));
    }
    let public =
        crate::protocol::signing::generate(path, comment).map_err(|e| err(e.to_string()))?;
    let line = public.to_openssh().map_err(|e| err(e.to_string()))?;
    Ok((line, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn makes_a_private_key_once_and_keeps_it() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("etc/bento/id_ed25519");
        let (line, made) = ensure(&path, "root@alpha").unwrap();
        assert!(made);
        assert!(line.starts_with("ssh-ed25519 "), "{line}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, made) = ensure(&path, "root@alpha").unwrap();
        assert!(!made);
        assert_eq!(again, line);
        std::fs::write(&path, "not a key").unwrap();
        let err = ensure(&path, "x").unwrap_err().to_string();
        assert!(err.contains("move it away"), "{err}");
    }
}
