//! Rollback holds: a host rolled back stays on what the operator chose until they release
//! it. One JSON file per host in `holds/`, written whole; a missing file is no hold.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::manifest::Digest;
use crate::protocol::HostName;

/// Why a host is held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub host: HostName,
    /// The version that was live before the rollback.
    pub from: Option<Digest>,
    /// The earlier version whose content went live again.
    pub to: Digest,
    /// The version the rollback published (live while held).
    pub version: Digest,
    /// When (RFC 3339).
    pub at: String,
    /// Who rolled it back.
    pub by: String,
}

#[derive(Debug, Clone)]
pub struct Holds {
    dir: PathBuf,
}

impl Holds {
    pub fn new(records: &Path) -> Self {
        Self {
            dir: records.join("holds"),
        }
    }

    fn path(&self, host: &HostName) -> PathBuf {
        self.dir.join(format!("{host}.json"))
    }

    /// The host's hold. An unreadable hold file is an error naming it: treating it as
    /// released would undo the operator's decision silently.
    pub fn get(&self, host: &HostName) -> std::io::Result<Option<Hold>> {
        let path = self.path(host);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}; delete it to release {host}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn set(&self, hold: &Hold) -> std::io::Result<()> {
        super::private_dir(&self.dir)?;
        let mut bytes = serde_json::to_vec_pretty(hold).expect("hold serialises");
        bytes.push(b'\n');
        crate::sys::atomic::write_file(&self.path(&hold.host), &bytes, 0o600)
    }

    /// Every hold, by host. An unreadable hold file is an error, as in [`Holds::get`].
    pub fn all(&self) -> std::io::Result<Vec<Hold>> {
        let mut holds = Vec::new();
        for host in self.held()? {
            holds.extend(self.get(&host)?);
        }
        holds.sort_by(|a, b| a.host.cmp(&b.host));
        Ok(holds)
    }

    /// The hosts with a hold file, from one listing: what [`Holds::get`] can find a hold
    /// for (a fleet's status asks about every host, and few are held).
    pub fn held(&self) -> std::io::Result<std::collections::BTreeSet<HostName>> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(e) => return Err(e),
        };
        let mut hosts = std::collections::BTreeSet::new();
        for entry in rd {
            let name = entry?.file_name();
            if let Some(host) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| HostName::new(n).ok())
            {
                hosts.insert(host);
            }
        }
        Ok(hosts)
    }

    /// Lifts the host's hold; returns the hold there was.
    pub fn release(&self, host: &HostName) -> std::io::Result<Option<Hold>> {
        let hold = self.get(host)?;
        if hold.is_some() {
            std::fs::remove_file(self.path(host))?;
        }
        Ok(hold)
    }
}
