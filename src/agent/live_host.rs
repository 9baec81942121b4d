//! Which host the live version is for: an agent whose agent.toml names another host than
//! the live manifest (a copied agent.toml, a key of the wrong account) must not run, not even
//! a no-op, because every run writes into the account's `logs/`.
//!
//! Invariant: [`check`] runs before anything is written to the server; it refuses only a
//! manifest that hashes to `current`'s digest and names another host (a broken or tampered
//! one is the apply's to report).

use super::fetch;
use super::outcome::AgentError;
use super::source::Source;
use super::state::StateDir;
use crate::protocol::manifest::{Digest, Manifest};
use crate::protocol::HostName;

/// Refuses a live version whose manifest names another host than `configured`. Reads the
/// local copy of an applied manifest (a no-op costs no transfer), else fetches it and
/// returns the bytes, so the apply does not fetch them twice.
pub fn check(
    src: &mut dyn Source,
    dirs: &StateDir,
    configured: &HostName,
    live: Digest,
) -> Result<Option<Vec<u8>>, AgentError> {
    let local = dirs.manifests().join(format!("{live}.json"));
    let (bytes, fetched) = match std::fs::read(&local) {
        Ok(bytes) if Digest::of(&bytes) == live => (bytes, false),
        _ => (fetch::manifest(src, live)?, true),
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
