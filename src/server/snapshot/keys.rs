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
/// Bytes kept from one chunk to the next, so a marker split across two reads is found.
const OVERLAP: usize = PEM_BEGIN.len() + MAX_LABEL + PEM_PRIVATE.len();

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
/// encrypted PEM) or an age secret key.
fn holds_private_key(bytes: &[u8]) -> bool {
    if memmem::find(bytes, AGE_SECRET).is_some() {
        return true;
    }
    memmem::find_iter(bytes, PEM_BEGIN).any(|at| {
        let rest = &bytes[at + PEM_BEGIN.len()..];
        let line = &rest[..rest.len().min(MAX_LABEL + PEM_PRIVATE.len())];
        let line = line.split(|&b| b == b'\n').next().unwrap_or(line);
        memmem::find(line, PEM_PRIVATE).is_some()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_even_across_chunks() {
        for key in [
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n",
            "-----BEGIN RSA PRIVATE KEY-----\n",
            "-----BEGIN PRIVATE KEY-----\n",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\n",
            "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ\n",
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
        ] {
            assert!(!holds_private_key(harmless.as_bytes()), "{harmless}");
        }
    }
}
