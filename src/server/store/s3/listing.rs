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
use crate::protocol::layout::{self, Area, Key};
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
            // Everything after `manifests/` itself (no key): both areas. SeaweedFS compares
            // by directory, so a bound between `manifests` and `manifests/` skips the area.
            let mut listed: Vec<String> = self
                .client
                .list_after(&l.bucket, &base, &format!("{base}manifests/"))
                .map_err(s3_err)?
                .into_iter()
                .map(|e| format!("{}/{}", l.bucket, e.key))
                .collect();
            // An engine that bounds the listing otherwise than S3 says would leave keys out,
            // and a key left out is one the serial check and GC never see: the live manifest
            // must be there, else each area is listed on its own.
            if !self.names_live(host, &full_base, &listed) {
                listed = LISTED
                    .iter()
                    .map(|a| {
                        self.client
                            .list(&l.bucket, &format!("{base}{}", a.prefix()))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(s3_err)?
                    .into_iter()
                    .flatten()
                    .map(|e| format!("{}/{}", l.bucket, e.key))
                    .collect();
            }
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

    /// Whether `listed` holds the manifest `current` names as this run read it (or there
    /// is no `current` to check against).
    fn names_live(&self, host: &HostName, full_base: &str, listed: &[String]) -> bool {
        let seen = self.seen.lock().expect("not poisoned").get(host).cloned();
        let Some(Some((bytes, _))) = seen else {
            return true;
        };
        let Ok(live) = layout::parse_current(&String::from_utf8_lossy(&bytes)) else {
            return true;
        };
        let key = format!("{full_base}{}", Key::Manifest(live).path());
        listed.contains(&key)
    }
}
