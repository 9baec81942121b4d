//! Spotting private keys in file contents while they are hashed (the bytes are read anyway):
//! the configuration tree ends up in the world-readable Nix store, so a key there is a
//! leaked key. Secrets belong in `files/`.

use memchr::memmem;

/// What starts an OpenSSH or PEM private key block, and an age identity.
const PEM_BEGIN: &[u8] = b"-----BEGIN ";
const PEM_PRIVATE: &[u8] = b"PRIVATE KEY-----";
const AGE_SECRET: &[u8] = b"AGE-SECRET-KEY-1";
/// The longest PEM label bento looks at (`-----BEGIN ENCRYPTED PRIVATE KEY-----` and the
/// like are far shorter); a longer one is not a key header.
const MAX_LABEL: usize = 48;
/// A Nix binary-cache secret key (`name:` and this many base64 characters, as
/// `nix key generate-secret` and `bento keygen --cache` write it): 64 bytes, the ed25519
/// seed and its public key, so `==` ends it.
const NIX_KEY_CHARS: usize = 88;
/// Bytes kept from one chunk to the next, so a marker split across two reads is found.
const OVERLAP: usize = {
    let pem = PEM_BEGIN.len() + MAX_LABEL + PEM_PRIVATE.len();
    // The key, the character before it and the one after.
    let nix = NIX_KEY_CHARS + 2;
    if pem > nix {
        pem
    } else {
        nix
    }
};

/// Fed the content chunk by chunk; says whether it held a private key.
#[derive(Default)]
pub struct KeySniffer {
    tail: Vec<u8>,
    found: bool,
}

impl KeySniffer {
    pub fn update(&mut self, chunk: &[u8]) {
        if self.found {
            return;
        }
        self.tail.extend_from_slice(chunk);
        self.found = holds_private_key(&self.tail);
        let keep = self.tail.len().saturating_sub(OVERLAP);
        self.tail.drain(..keep);
    }

    pub fn found(&self) -> bool {
        self.found
    }
}

/// True when `bytes` holds `-----BEGIN <label>PRIVATE KEY-----` (OpenSSH, PKCS#1/#8, EC,
/// encrypted PEM), an age secret key or a Nix cache secret key.
fn holds_private_key(bytes: &[u8]) -> bool {
    if memmem::find(bytes, AGE_SECRET).is_some() || holds_nix_secret_key(bytes) {
        return true;
    }
    memmem::find_iter(bytes, PEM_BEGIN).any(|at| {
        let rest = &bytes[at + PEM_BEGIN.len()..];
        let line = &rest[..rest.len().min(MAX_LABEL + PEM_PRIVATE.len())];
        let line = line.split(|&b| b == b'\n').next().unwrap_or(line);
        memmem::find(line, PEM_PRIVATE).is_some()
    })
}

fn is_base64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

/// True when `bytes` holds a Nix cache secret key: 88 base64 characters standing alone
/// (with or without its `name:`) that decode to an ed25519 seed followed by that seed's
/// own public key. The last check is what makes it a key and not any 64 bytes of base64,
/// and it also catches the configured cache key's bytes copied without their name.
fn holds_nix_secret_key(bytes: &[u8]) -> bool {
    use base64::Engine as _;
    memmem::find_iter(bytes, b"==").any(|at| {
        let end = at + 2;
        let Some(start) = end.checked_sub(NIX_KEY_CHARS) else {
            return false;
        };
        let token = &bytes[start..end];
        if !token[..NIX_KEY_CHARS - 2].iter().all(|&b| is_base64(b))
            || start.checked_sub(1).is_some_and(|i| is_base64(bytes[i]))
            || bytes.get(end) == Some(&b'=')
        {
            return false;
        }
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(token) else {
            return false;
        };
        let (Ok(seed), Ok(public)) = (
            <[u8; 32]>::try_from(&raw[..raw.len().min(32)]),
            <[u8; 32]>::try_from(&raw[raw.len().min(32)..]),
        ) else {
            return false;
        };
        ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes()
            == public
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key in the shape `nix key generate-secret --key-name bento-test-1` writes, and
    /// its public half (`nix key convert-secret-to-public`).
    fn nix_key() -> (String, String) {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let seed = [7u8; 32];
        let public = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        let secret = [seed, public].concat();
        (
            format!("bento-test-1:{}", b64(&secret)),
            format!("bento-test-1:{}", b64(&public)),
        )
    }

    #[test]
    fn keys_are_found_even_across_chunks() {
        let (nix_secret, nix_public) = nix_key();
        let nix_bare = &nix_secret[nix_secret.find(':').unwrap() + 1..];
        for key in [
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n",
            "-----BEGIN RSA PRIVATE KEY-----\n",
            "-----BEGIN PRIVATE KEY-----\n",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\n",
            "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ\n",
            nix_secret.as_str(),
            nix_bare,
        ] {
            let text = format!("{{ ... }}: {{ x = ''\n{key}''; }}\n");
            assert!(holds_private_key(text.as_bytes()), "{key}");
            for split in 1..text.len() {
                let mut s = KeySniffer::default();
                s.update(&text.as_bytes()[..split]);
                s.update(&text.as_bytes()[split..]);
                assert!(s.found(), "{key} split at {split}");
            }
        }
        for harmless in [
            "-----BEGIN PUBLIC KEY-----\n",
            "-----BEGIN CERTIFICATE-----\n",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI alice\n",
            "-----BEGIN OPENSSH\nPRIVATE KEY-----",
            "age1qyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqs",
            // The public half, and 64 bytes of base64 that are not seed + public key.
            nix_public.as_str(),
            &format!("x:{}==", "A".repeat(86)),
        ] {
            assert!(!holds_private_key(harmless.as_bytes()), "{harmless}");
        }
    }
}
