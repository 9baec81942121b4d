//! A host's plan: what its scanned directory, `files.toml` and settings make (a manifest
//! and where each object's bytes come from), and the configuration tree it stands for
//! written out (dry runs and previews).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::{Commit, HostPlan, PublishError};
use crate::nix::StorePath;
use crate::protocol::manifest::{Digest, Manifest, FORMAT};
use crate::server::fleet::{HostName, HostSource};
use crate::server::hostfiles;

/// Builds the plan of each host (pure, apart from reading `files.toml`).
pub fn plan(
    fleet: &crate::server::fleet::FleetConfig,
    sources: &[HostSource],
    created: &crate::protocol::Timestamp,
    source_commit: Option<&Commit>,
    systems: &BTreeMap<HostName, StorePath>,
) -> Result<Vec<HostPlan>, PublishError> {
    use rayon::prelude::*;
    // Each host's files are its own work: a fleet of 1,000 hosts splits them on every core.
    sources
        .par_iter()
        .map(|s| {
            let mut content = hostfiles::split(&s.items, s.files_prefix.as_deref(), &s.dir)?;
            if content
                .config
                .iter()
                .any(|e| e.path().as_str() == crate::protocol::settings::FILE)
            {
                return Err(PublishError::Reserved(
                    s.dir.join(crate::protocol::settings::FILE),
                ));
            }
            // The host's settings travel inside its snapshot.
            let bytes: Arc<[u8]> = fleet.settings(&s.name).to_bytes().into();
            let digest = Digest::of(&bytes);
            content
                .config
                .push(crate::protocol::manifest::ConfigEntry::File {
                    path: crate::protocol::manifest::RelPath::new(crate::protocol::settings::FILE)
                        .expect("valid name"),
                    size: bytes.len() as u64,
                    sha256: digest,
                    executable: false,
                });
            content
                .sources
                .insert(digest, hostfiles::Source::Bytes(bytes));
            let mut manifest = Manifest {
                format: FORMAT,
                host: s.name.clone(),
                created: created.clone(),
                serial: 0,
                source_commit: source_commit.map(|c| c.id.clone()),
                dirty: source_commit.is_some_and(|c| c.dirty),
                build: s.build,
                system: systems.get(&s.name).cloned(),
                config: content.config,
                tree: None,
                files: content.files,
            };
            manifest.canonicalize();
            Ok(HostPlan {
                host: s.name.clone(),
                manifest,
                sources: content.sources,
                keep_live: None,
                live: None,
            })
        })
        .collect::<Vec<_>>()
        // The first host's error in fleet order, whichever thread met it first.
        .into_iter()
        .collect()
}

/// Writes a plan's configuration tree — exactly what the host will build, generated
/// `bento-host.json` included, secrets excluded — into `dest` (which exists).
pub fn materialize_config(plan: &HostPlan, dest: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in &plan.manifest.config {
        let path = dest.join(entry.path().as_str());
        match entry {
            crate::protocol::manifest::ConfigEntry::Directory { .. } => {
                std::fs::create_dir_all(&path)?
            }
            crate::protocol::manifest::ConfigEntry::File {
                sha256, executable, ..
            } => {
                match plan.sources.get(sha256) {
                    Some(source) => {
                        std::io::copy(&mut source.open()?, &mut std::fs::File::create(&path)?)?;
                    }
                    None => {
                        return Err(std::io::Error::other(format!(
                            "no source for {}",
                            entry.path()
                        )))
                    }
                }
                let mode = if *executable { 0o755 } else { 0o644 };
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            }
        }
    }
    Ok(())
}
