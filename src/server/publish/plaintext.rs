//! What publish says when `[secrets] encrypt` is on but versions kept from before still
//! hold plaintext secrets (issue #23 item 15): they stay rollback targets, so the operator
//! must know that rolling back ships those secrets in the clear again.

use super::{live_digest, KEEP_VERSIONS};
use crate::protocol::manifest::Manifest;
use crate::protocol::HostName;
use crate::server::store::Store;

/// Issue #23 item 15: with `[secrets] encrypt` switched on, the versions kept from before
/// still hold their secrets in the clear (their objects, and the pool) until newer versions
/// replace them; rolling back to one ships those plaintext secrets again. Say so.
pub fn kept(store: &dyn Store, host: &HostName) -> Option<String> {
    use crate::protocol::layout::{Area, Key};
    let live = live_digest(store, host);
    let mut old = Vec::new();
    for key in store.list(host, Area::Manifests).ok()? {
        let Key::Manifest(d) = key else { continue };
        if Some(d) == live {
            continue;
        }
        let Some(m) = store
            .get(host, &key, crate::protocol::manifest::MAX_MANIFEST_BYTES)
            .ok()
            .flatten()
            .and_then(|b| Manifest::parse(&b).ok())
        else {
            continue;
        };
        if m.files
            .iter()
            .any(|f| f.encrypted.is_none() && !f.path.as_str().ends_with(".age"))
        {
            old.push(d.short());
        }
    }
    (!old.is_empty()).then(|| {
        format!(
            "{host}: kept version{} {} from before [secrets] encrypt hold{} secrets in the clear in the chroot until {} newer publishes replace {}; rolling back to {} ships those plaintext secrets again",
            if old.len() == 1 { "" } else { "s" },
            old.join(", "),
            if old.len() == 1 { "s" } else { "" },
            KEEP_VERSIONS - 1,
            if old.len() == 1 { "it" } else { "them" },
            if old.len() == 1 { "it" } else { "one" },
        )
    })
}
