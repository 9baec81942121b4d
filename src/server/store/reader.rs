//! [`HostReader`]: several reads of one host's area in a row (`bento status` reads four or
//! five keys of every host of a fleet). A store that can do better than one lookup per key
//! hands out its own [`HostRead`] once per host (the chroot opens the host's directory once
//! and reads relative to it); any other store is read key by key, as before. Either way the
//! answers are the store's own: the same bytes, the same `None`, the same errors and
//! refusals (host-written files are never read through a link).

use super::{Key, LogsError, Store, StoreError};
use crate::protocol::HostName;
use crate::server::logs::Stamped;
use crate::sys::stamp::Stamp;

/// A store's own reader of one host's area (see [`Store::host_reader`]). Each method
/// answers exactly as the store's method of the same name does for that host.
pub trait HostRead {
    fn get(&self, key: &Key, limit: u64) -> Result<Option<Vec<u8>>, StoreError>;
    fn get_prefix(&self, key: &Key, len: u64) -> Result<Option<Vec<u8>>, StoreError>;
    /// With each file's stamp as it was read, where the store has one.
    fn read_logs_received(&self, names: &[&str]) -> Vec<Result<Stamped, LogsError>>;

    /// The stamp of `current` or of a file directly in `logs/` (never through a link at its
    /// end, and only a regular file a read would not refuse), for a cache that skips
    /// re-reading unchanged files; `None` when the store cannot tell, or the file is not
    /// there as one (it is read then, and the read says why).
    fn stamp(&self, _key: &Key) -> Option<Stamp> {
        None
    }
}

/// Reads one host's area: through the store's own [`HostRead`] when it has one, else key by
/// key through the store.
pub struct HostReader<'a> {
    store: &'a dyn Store,
    host: &'a HostName,
    own: Option<Box<dyn HostRead + 'a>>,
}

impl<'a> HostReader<'a> {
    pub fn new(store: &'a dyn Store, host: &'a HostName) -> Self {
        Self {
            store,
            host,
            own: store.host_reader(host),
        }
    }

    pub fn store(&self) -> &'a dyn Store {
        self.store
    }

    pub fn host(&self) -> &'a HostName {
        self.host
    }

    /// [`Store::get`] of this host.
    pub fn get(&self, key: &Key, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.own {
            Some(r) => r.get(key, limit),
            None => self.store.get(self.host, key, limit),
        }
    }

    /// [`Store::get_prefix`] of this host.
    pub fn get_prefix(&self, key: &Key, len: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.own {
            Some(r) => r.get_prefix(key, len),
            None => self.store.get_prefix(self.host, key, len),
        }
    }

    /// [`HostRead::stamp`] of this host; `None` for a store without its own reader.
    pub fn stamp(&self, key: &Key) -> Option<Stamp> {
        self.own.as_ref()?.stamp(key)
    }

    /// [`Store::read_logs_received`] of this host, with each file's stamp when the store's
    /// own reader has one.
    pub fn read_logs_received(&self, names: &[&str]) -> Vec<Result<Stamped, LogsError>> {
        match &self.own {
            Some(r) => r.read_logs_received(names),
            None => (self.store.read_logs_received(self.host, names).into_iter())
                .map(|read| read.map(|r| (r, None)))
                .collect(),
        }
    }
}
