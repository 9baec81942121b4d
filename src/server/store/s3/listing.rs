//! A host's `manifests/` and `objects/` as the serial check and GC ask for them: from the
//! publisher's index while it is trusted to be the whole of them, else from one listing of
//! the engine (both areas in one request where they hold fewer than a page of keys), which
//! then makes the index exact again.
//!
//! Invariant: a key is answered from the index only by a run holding the publish lock whose
//! index listed the host and saw every write since (`s3index::Index::trusted`); anything
//! else lists the engine.

use super::current::unix_now;
use super::{s3_err, S3Store};
use crate::protocol::layout::{Area, Key};
use crate::protocol::HostName;
use crate::server::store::StoreError;

/// The areas one listing covers, in key order: `manifests/` sorts right before `objects/`,
/// and nothing the layout writes sorts after it.
const LISTED: [Area; 2] = [Area::Manifests, Area::Objects];

impl S3Store {
    /// The keys of `area` under the host's prefix, in key order.
    pub(super) fn list_area(&self, host: &HostName, area: Area) -> Result<Vec<Key>, StoreError> {
        let l = self.host_location(host)?;
        let base = l.list_prefix();
        let full_base = format!("{}/{base}", l.bucket);
        let now = unix_now();
        let prefix = format!("{full_base}{}", area.prefix());
        let names = if !LISTED.contains(&area) {
            self.client
                .list(&l.bucket, &format!("{base}{}", area.prefix()))
                .map_err(s3_err)?
                .into_iter()
                .map(|e| format!("{}/{}", l.bucket, e.key))
                .collect()
        } else if let Some(known) = self.index.listing(host, &prefix, now) {
            known
        } else {
            // Everything after `manifests.` ('.' sorts right before '/'): both areas.
            let listed = self
                .client
                .list_after(&l.bucket, &base, &format!("{base}manifests."))
                .map_err(s3_err)?;
            let listed: Vec<String> = listed
                .into_iter()
                .map(|e| format!("{}/{}", l.bucket, e.key))
                .collect();
            let prefixes: Vec<String> = LISTED
                .iter()
                .map(|a| format!("{full_base}{}", a.prefix()))
                .collect();
            // Only keys the index may hold as present (a key that parses as the
            // protocol's), so answering from it later gives what this listing gives.
            let keys: Vec<String> = listed
                .iter()
                .filter(|k| {
                    k.strip_prefix(&full_base)
                        .and_then(Key::parse)
                        .is_some_and(|key| !key.host_written() && key != Key::Current)
                })
                .cloned()
                .collect();
            self.index.set_listing(host, &prefixes, keys, now);
            listed
                .into_iter()
                .filter(|k| k.starts_with(&prefix))
                .collect()
        };
        let mut keys: Vec<Key> = names
            .iter()
            .filter_map(|k| k.strip_prefix(&full_base))
            .filter(|rel| rel.starts_with(area.prefix()))
            .filter_map(Key::parse)
            .collect();
        keys.sort();
        Ok(keys)
    }
}
