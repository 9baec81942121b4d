//! The signed freshness stamp (`manifests/<digest>.fresh`, with `[server] freshness`): the
//! fleet key's word that `version` is still host `host`'s live version, until `not_after`.
//! A copy of a host's tree (a mirror, a frozen or compromised store) can withhold newer
//! versions, but only until the stamp it holds runs out; the host then reports `stale`.
//!
//! Invariant: a stamp is accepted only for the host and the digest it was fetched for, and,
//! with trusted keys, only with a `bento` signature by one of them over its first line; its
//! time decides staleness only (the replay rule stays serial-based), with
//! [`SKEW_TOLERANCE`] for clocks that disagree.
//!
//! ```text
//! {"format":1,"host":"alpha","version":"<digest>","serial":7,"not_after":"2026-12-13T10:00:00Z"}
//! -----BEGIN SSH SIGNATURE-----       SSHSIG (namespace `bento`) over the first line,
//! …                                   its newline included
//! -----END SSH SIGNATURE-----
//! ```

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use ssh_key::PublicKey;

use crate::protocol::manifest::Digest;
use crate::protocol::signing::{self, Signer, SigningError};
use crate::protocol::{HostName, Timestamp};

/// The stamp format this build writes and reads.
pub const FORMAT: u32 = 1;
/// A stamp larger than this is refused unread (it is one line and a signature).
pub const MAX_STAMP_BYTES: u64 = 4096;
/// How far past `not_after` a host's clock may be before it calls the stamp run out: the
/// publisher's and the host's clocks are not the same clock.
pub const SKEW_TOLERANCE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum FreshError {
    #[error("the freshness stamp is {0} bytes, more than the {MAX_STAMP_BYTES}-byte limit")]
    TooLarge(u64),
    #[error("the freshness stamp is not one line of JSON and a signature")]
    Shape,
    #[error("the freshness stamp is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("freshness stamp format {0} is not supported (this bento reads format {FORMAT})")]
    Format(u32),
    #[error("the freshness stamp is for host {found}, not {expected}")]
    WrongHost { expected: HostName, found: HostName },
    #[error("the freshness stamp vouches for version {}, not for the live version {}", .found.short(), .expected.short())]
    WrongVersion { expected: Digest, found: Digest },
    #[error("the freshness stamp's signature: {0}")]
    Signature(#[from] SigningError),
}

/// What a stamp says (its first line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreshStamp {
    pub format: u32,
    pub host: HostName,
    /// The live version's digest: the stamp vouches for this version only.
    pub version: Digest,
    /// The live version's serial (for people and logs; versions are ordered by manifests).
    pub serial: u64,
    /// Until when the version is vouched for (RFC 3339 UTC, whole seconds).
    pub not_after: Timestamp,
}

impl FreshStamp {
    /// A stamp for `version` of `host`, running out `window` after `now`.
    pub fn new(
        host: &HostName,
        version: Digest,
        serial: u64,
        now: SystemTime,
        window: Duration,
    ) -> Self {
        Self {
            format: FORMAT,
            host: host.clone(),
            version,
            serial,
            not_after: Timestamp::seconds(now + window),
        }
    }

    /// The signed line: compact JSON and a newline.
    fn line(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).expect("a stamp serialises");
        out.push(b'\n');
        out
    }

    /// The file's bytes: the line, then the armored signature over it.
    pub fn sign(&self, signer: &Signer) -> Result<Vec<u8>, SigningError> {
        let line = self.line();
        let sig = signer.sign(&line)?;
        let mut out = line;
        out.extend_from_slice(sig.as_bytes());
        if !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        Ok(out)
    }

    /// Parses a stamp fetched for `version` of `host`. With `trusted` keys the signature must
    /// be one of theirs; without (an agent that verifies nothing) it is not looked at.
    pub fn parse_untrusted(
        bytes: &[u8],
        host: &HostName,
        version: &Digest,
        trusted: Option<&[PublicKey]>,
    ) -> Result<Self, FreshError> {
        if bytes.len() as u64 > MAX_STAMP_BYTES {
            return Err(FreshError::TooLarge(bytes.len() as u64));
        }
        let at = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(FreshError::Shape)?;
        let (line, sig) = bytes.split_at(at + 1);
        if let Some(trusted) = trusted {
            signing::verify(trusted, line, sig)?;
        }
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_slice(line)?;
        if head.format != FORMAT {
            return Err(FreshError::Format(head.format));
        }
        let stamp: FreshStamp = serde_json::from_slice(line)?;
        if stamp.host != *host {
            return Err(FreshError::WrongHost {
                expected: host.clone(),
                found: stamp.host,
            });
        }
        if stamp.version != *version {
            return Err(FreshError::WrongVersion {
                expected: *version,
                found: stamp.version,
            });
        }
        Ok(stamp)
    }

    /// Whether the stamp has run out at `now`, by more than [`SKEW_TOLERANCE`].
    pub fn expired(&self, now: SystemTime) -> bool {
        self.not_after.system_time() + SKEW_TOLERANCE < now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (tempfile::TempDir, Signer, Vec<PublicKey>) {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("key");
        let public = signing::generate(&path, "test").unwrap();
        let trusted = signing::parse_trusted(&[public.to_openssh().unwrap()]).unwrap();
        (t, Signer::load(&path).unwrap(), trusted)
    }

    #[test]
    fn a_signed_stamp_parses_back_for_its_host_and_version_only() {
        let (_t, signer, trusted) = key();
        let alpha = HostName::new("alpha").unwrap();
        let v = Digest::of(b"v");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let stamp = FreshStamp::new(&alpha, v, 7, now, Duration::from_secs(3600));
        let bytes = stamp.sign(&signer).unwrap();
        assert!((bytes.len() as u64) < MAX_STAMP_BYTES);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"format":1,"host":"alpha","version":""#)
                && text.contains(r#","serial":7,"not_after":"2027-01-15T09:00:00Z"}"#),
            "{text}"
        );
        let back = FreshStamp::parse_untrusted(&bytes, &alpha, &v, Some(&trusted)).unwrap();
        assert_eq!(back, stamp);
        assert!(matches!(
            FreshStamp::parse_untrusted(&bytes, &alpha, &Digest::of(b"w"), Some(&trusted)),
            Err(FreshError::WrongVersion { .. })
        ));
        let beta = HostName::new("beta").unwrap();
        assert!(matches!(
            FreshStamp::parse_untrusted(&bytes, &beta, &v, Some(&trusted)),
            Err(FreshError::WrongHost { .. })
        ));
        // A later not-after written into the line breaks the signature.
        let moved = text.replace("2027-01-15", "2027-02-15");
        let err =
            FreshStamp::parse_untrusted(moved.as_bytes(), &alpha, &v, Some(&trusted)).unwrap_err();
        assert!(matches!(err, FreshError::Signature(_)), "{err}");
        // Without trusted keys the signature is not looked at; the names still are.
        let back = FreshStamp::parse_untrusted(moved.as_bytes(), &alpha, &v, None).unwrap();
        assert_eq!(back.not_after.as_str(), "2027-02-15T09:00:00Z");
        // Signed by another key.
        let (_o, other, _) = key();
        let foreign = stamp.sign(&other).unwrap();
        assert!(matches!(
            FreshStamp::parse_untrusted(&foreign, &alpha, &v, Some(&trusted)),
            Err(FreshError::Signature(SigningError::Untrusted))
        ));
        assert!(matches!(
            FreshStamp::parse_untrusted(b"no newline", &alpha, &v, None),
            Err(FreshError::Shape)
        ));
    }

    #[test]
    fn a_stamp_runs_out_after_its_not_after_and_the_skew_tolerance() {
        let alpha = HostName::new("alpha").unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let stamp = FreshStamp::new(&alpha, Digest::of(b"v"), 1, now, Duration::from_secs(60));
        assert!(!stamp.expired(now));
        assert!(!stamp.expired(now + Duration::from_secs(60) + SKEW_TOLERANCE));
        assert!(stamp.expired(now + Duration::from_secs(61) + SKEW_TOLERANCE));
    }
}
