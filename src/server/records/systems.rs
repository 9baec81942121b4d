//! The system each host's published configuration evaluated to (`systems/<host>.json`):
//! the `.drv` the evaluation gate instantiated, keyed by the configuration it came from.
//! A record whose key is not the live version's configuration says nothing about it, so
//! a stale or lost record can only cause a new version, never hide one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::HostName;

/// What one host's configuration evaluated to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemRecord {
    /// `build::record::content_key` of the configuration tree that was evaluated.
    pub key: String,
    /// The system derivation it instantiated.
    pub drv: String,
}

/// The evaluated-system records of a fleet.
#[derive(Debug, Clone)]
pub struct Systems {
    dir: PathBuf,
}

impl Systems {
    pub fn new(records: &Path) -> Self {
        Self {
            dir: records.join("systems"),
        }
    }

    fn path(&self, host: &HostName) -> PathBuf {
        self.dir.join(format!("{}.json", host.as_str()))
    }

    /// The derivation recorded for `key`; `None` without a record, with an unreadable one or
    /// one for another configuration (each of which means "publish as changed").
    pub fn drv_for(&self, host: &HostName, key: &str) -> Option<String> {
        let bytes = std::fs::read(self.path(host)).ok()?;
        let rec: SystemRecord = serde_json::from_slice(&bytes).ok()?;
        (rec.key == key).then_some(rec.drv)
    }

    /// Records what `key` evaluated to, replacing the host's previous record.
    pub fn put(&self, host: &HostName, rec: &SystemRecord) -> std::io::Result<()> {
        super::private_dir(&self.dir)?;
        let bytes = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
        crate::sys::atomic::write_file(&self.path(host), &bytes, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_answers_only_for_its_configuration() {
        let t = tempfile::tempdir().unwrap();
        let s = Systems::new(t.path());
        let h = HostName::new("web1").unwrap();
        assert_eq!(s.drv_for(&h, "k1"), None);
        let rec = SystemRecord {
            key: "k1".into(),
            drv: "/nix/store/aaa-nixos-system.drv".into(),
        };
        s.put(&h, &rec).unwrap();
        assert_eq!(s.drv_for(&h, "k1").as_deref(), Some(rec.drv.as_str()));
        assert_eq!(s.drv_for(&h, "k2"), None, "another configuration");
        std::fs::write(t.path().join("systems/web1.json"), "x").unwrap();
        assert_eq!(s.drv_for(&h, "k1"), None, "a broken record means changed");
    }
}
