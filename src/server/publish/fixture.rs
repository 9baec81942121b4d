//! Test fixtures of publish's unit tests: a host's version built from a few files, as the
//! planner would make it (one place, so every test publishes the same shape of plan).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::HostPlan;
use crate::protocol::manifest::{Build, ConfigEntry, Digest, Manifest, RelPath, FORMAT};
use crate::server::fleet::HostName;
use crate::server::hostfiles::Source;

/// One host's version: each `(path, text)` a file of its configuration tree.
pub fn plan(host: &str, files: &[(&str, &str)], secs: u64) -> HostPlan {
    let mut sources = crate::server::hostfiles::Sources::default();
    let mut config = Vec::new();
    for (path, text) in files {
        let bytes: Arc<[u8]> = text.as_bytes().into();
        let sha = Digest::of(&bytes);
        config.push(ConfigEntry::File {
            path: RelPath::new(path).unwrap(),
            size: bytes.len() as u64,
            sha256: sha,
            executable: false,
        });
        sources.insert(sha, Source::Bytes(bytes));
    }
    let mut manifest = Manifest {
        format: FORMAT,
        host: HostName::new(host).unwrap(),
        created: crate::protocol::Timestamp::millis(
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        ),
        serial: 0,
        source_commit: None,
        dirty: false,
        build: Build::Classic,
        system: None,
        config,
        tree: None,
        files: vec![],
    };
    manifest.canonicalize();
    HostPlan {
        host: HostName::new(host).unwrap(),
        manifest,
        sources,
        keep_live: None,
        live: None,
    }
}
