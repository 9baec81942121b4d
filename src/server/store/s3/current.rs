//! A host's `current` read from the engine: asked with the ETag the publisher's index holds,
//! so an unchanged one is a 304 and the index's copy of its text is used.
//!
//! Invariant: the answer of `fetch_current` is the engine's now (never this run's memory of
//! it); the index only saves the body. `current_remembered` is the one answer from memory,
//! for a switch that is conditional on it (`Store::remembered_current`). A host's
//! confirmation of its live version is tied to the ETag `current` had when the heartbeat
//! was read, so any write of `current` since voids it.

use super::{s3_err, S3Store, MAX_CURRENT_BYTES};
use crate::protocol::layout::Key;
use crate::protocol::HostName;
use crate::server::store::Cas;
use crate::server::store::{StoreError, Version};
use crate::sys::s3::{Got, S3Error};

/// The publisher's clock in Unix seconds (0 before 1970: nothing counts as recent).
pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl S3Store {
    fn current_key(&self, host: &HostName) -> Option<String> {
        let (l, k) = self.at(host, &Key::Current).ok()?;
        Some(format!("{}/{k}", l.bucket))
    }

    /// `Store::confirmed`: `version` (the ETag the engine just gave for `current`) is the one
    /// the index holds a recent confirmation for.
    pub(super) fn current_confirmed(&self, host: &HostName, version: &Version) -> bool {
        self.current_key(host)
            .is_some_and(|full| self.index.confirmed(host, &full, &version.0, unix_now()))
    }

    pub(super) fn confirm_current(&self, host: &HostName, version: &Version) {
        if let Some(full) = self.current_key(host) {
            self.index.confirm(host, &full, &version.0, unix_now());
        }
    }

    /// `Store::remembered_current`: the index's `current`, while the engine honours the
    /// switch's condition (a stale guess loses the switch) and the host's listing is
    /// trusted (every write to the host since was this publisher's, as far as it knows).
    pub(super) fn current_remembered(&self, host: &HostName) -> Option<(Vec<u8>, Version)> {
        if self.cas() != Cas::Honoured || !self.index.trusted(host, unix_now()) {
            return None;
        }
        let (text, etag) = self.index.current(host, &self.current_key(host)?)?;
        Some((text.into_bytes(), Version(etag)))
    }

    /// `current` from the engine (asked with its indexed ETag), never this run's memory.
    pub(super) fn fetch_current(
        &self,
        host: &HostName,
    ) -> Result<Option<(Vec<u8>, Version)>, StoreError> {
        let (l, k) = self.at(host, &Key::Current)?;
        let full = format!("{}/{k}", l.bucket);
        let cached = self.index.current(host, &full);
        let got = self.client.get(
            &l.bucket,
            &k,
            MAX_CURRENT_BYTES,
            cached.as_ref().map(|(_, etag)| etag.as_str()),
        );
        // A `current` this index neither wrote nor last saw: something else wrote to the
        // host (another publisher, a restored store), so its listing is taken again.
        let foreign = match &got {
            Ok(Got::Body { etag, .. }) => {
                etag.is_none() || cached.as_ref().map(|(_, e)| e) != etag.as_ref()
            }
            Ok(Got::NotFound) => cached.is_some(),
            _ => false,
        };
        if foreign {
            self.index.distrust(host);
        }
        match got {
            Ok(Got::NotModified) => match cached {
                Some((text, etag)) => Ok(Some((text.into_bytes(), Version(etag)))),
                None => Ok(None),
            },
            Ok(Got::Body { bytes, etag, .. }) => {
                // Without an ETag the bytes are the version (a compare by content).
                let version = match etag {
                    Some(e) => {
                        let text = String::from_utf8_lossy(&bytes).into_owned();
                        self.index.set_current(host, &full, Some((text, e.clone())));
                        e
                    }
                    None => String::from_utf8_lossy(&bytes).into(),
                };
                Ok(Some((bytes, Version(version))))
            }
            Ok(Got::NotFound) => {
                self.index.set_current(host, &full, None);
                Ok(None)
            }
            // A broken `current` longer than a line counts by its head.
            Err(S3Error::TooLarge { .. }) => {
                let mut out = Vec::new();
                self.client
                    .get_range(&l.bucket, &k, 0, MAX_CURRENT_BYTES, &mut out)
                    .map_err(s3_err)?;
                let head = self.client.head(&l.bucket, &k).map_err(s3_err)?;
                let version = head.and_then(|h| h.etag).unwrap_or_default();
                Ok(Some((out, Version(version))))
            }
            Err(e) => Err(s3_err(e)),
        }
    }
}
