//! [`HostReader`]: several reads of one host's area in a row (`bento status` reads four or
//! five keys of every host of a fleet). A store that can do better than one lookup per key
//! hands out its own [`HostRead`] once per host (the chroot opens the host's directory once
//! and reads relative to it); any other store is read key by key, as before. Either way the
//! answers are the store's own: the same bytes, the same `None`, the same errors and
//! refusals (host-written files are never read through a link).

use super::{Key, LogsError, Store, StoreError};
use crate::protocol::HostName;
use crate::server::logs::Received;

/// A store's own reader of one host's area (see [`Store::host_reader`]). Each method
/// answers exactly as the store's method of the same name does for that host.
pub trait HostRead {
    fn get(&self, key: &Key, limit: u64) -> Result<Option<Vec<u8>>, StoreError>;
    fn get_prefix(&self, key: &Key, len: u64) -> Result<Option<Vec<u8>>, StoreError>;
    fn read_logs_received(&self, names: &[&str]) -> Vec<Result<Received, LogsError>>;
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

    /// [`Store::read_logs_received`] of this host.
    pub fn read_logs_received(&self, names: &[&str]) -> Vec<Result<Received, LogsError>> {
        match &self.own {
            Some(r) => r.read_logs_received(names),
            None => self.store.read_logs_received(self.host, names),
        }
    }
}
