//! Which host the live version is for: an agent whose agent.toml names another host than
//! the live manifest (a copied agent.toml, a key of the wrong account) must not run, not even
//! a no-op, because every run writes into the account's `logs/`.
//!
//! Invariant: [`check`] runs before anything is written to the server; it refuses only a
//! manifest that hashes to `current`'s digest and names another host (a broken or tampered
//! one is the apply's to report).

use super::fetch;
use super::outcome::AgentError;
use super::source::{RemoteError, Source};
use super::state::StateDir;
use crate::protocol::manifest::{Digest, Manifest};
use crate::protocol::signing;
use crate::protocol::HostName;

/// Refuses a live version whose manifest names another host than `configured`. Reads the
/// local copy of an applied manifest (a no-op costs no transfer), else fetches it and
/// returns the bytes, so the apply does not fetch them twice.
///
/// With `trusted_keys`, a manifest is fetched here only when its signature comes from a
/// trusted key (issue #23 item 11: nothing unsigned is downloaded); any other new version is
/// left to the apply, which refuses and reports it before downloading it.
pub fn check(
    src: &mut dyn Source,
    dirs: &StateDir,
    configured: &HostName,
    live: Digest,
    trusted_keys: &[String],
) -> Result<Option<Vec<u8>>, AgentError> {
    let local = dirs.manifests().join(format!("{live}.json"));
    let (bytes, fetched) = match std::fs::read(&local) {
        Ok(bytes) if Digest::of(&bytes) == live => (bytes, false),
        _ if !trusted_keys.is_empty() && !signed_by_trusted(src, live, trusted_keys) => {
            return Ok(None)
        }
        _ => match fetch::manifest(src, live) {
            Ok(bytes) => (bytes, true),
            // Oversized: a refusal the apply reports, not an interrupted run.
            Err(RemoteError::TooLarge { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        },
    };
    if Digest::of(&bytes) == live {
        if let Ok(manifest) = Manifest::parse(&bytes) {
            if manifest.host != *configured {
                return Err(AgentError::WrongHost {
                    configured: configured.clone(),
                    live: manifest.host,
                    version: live,
                });
            }
        }
    }
    Ok(fetched.then_some(bytes))
}

/// Whether the live version's signature comes from one of `trusted_keys` (read bounded; any
/// failure is `false`, for the apply to report).
fn signed_by_trusted(src: &mut dyn Source, live: Digest, trusted_keys: &[String]) -> bool {
    let Ok(trusted) = signing::parse_trusted(trusted_keys) else {
        return false;
    };
    matches!(fetch::signature(src, live), Ok(Some(sig)) if signing::check_signer(&trusted, &sig).is_ok())
}
