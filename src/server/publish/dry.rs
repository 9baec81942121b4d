//! `publish --dry-run`: each host decided exactly as publish decides it (`host::decide`),
//! and what its new version would change (`changes`), reading the store and never writing.

use std::collections::BTreeMap;
use std::io::Read as _;

use super::changes::{self, Changes};
use super::host::{decide, live_version, Decision};
use super::{HostPlan, HostReport, PublishError, Status};
use crate::protocol::layout::Key;
use crate::protocol::HostName;
use crate::server::store::Store;

/// The most a live `bento-host.json` is read for a comparison.
const MAX_SETTINGS_BYTES: u64 = 1024 * 1024;

/// What publishing `plan` would do: `published` (with what changes as its reason: `files
/// changed, settings changed`), or the `unchanged` publish itself would report. `digest`
/// is the live version, which a dry run leaves live.
pub fn report(
    store: &dyn Store,
    plan: &HostPlan,
    numbering: &super::Numbering<'_>,
) -> Result<HostReport, PublishError> {
    match decide(store, plan, numbering)? {
        Decision::Keep { report, .. } => Ok(*report),
        Decision::New(new) => {
            let live = new.live.as_ref().map(|(_, m)| m);
            let live_settings = live.and_then(|m| settings_of_live(store, &plan.host, m));
            let what = changes::compare(
                live.map(|m| (m, live_settings.as_deref())),
                &new.manifest,
                settings_of_plan(plan).as_deref(),
            );
            let mut why = what.summary().join(", ");
            if why.is_empty() {
                // Same content, new serial: the live one is not proven or below the floor.
                why = "renumbered".to_owned();
            }
            Ok(HostReport {
                host: plan.host.clone(),
                status: Status::Published,
                digest: new.live.as_ref().map(|(d, _)| *d),
                config_entries: new.manifest.config.len(),
                files: new.manifest.files.len(),
                objects: new.manifest.objects().len(),
                new_objects: new
                    .manifest
                    .objects()
                    .iter()
                    .filter(|d| !store.exists(&plan.host, &Key::Object(**d)).unwrap_or(false))
                    .count(),
                bytes: 0,
                error: None,
                reason: Some(why),
                warnings: new.warnings.clone(),
            })
        }
    }
}

/// What each plan would change against its host's live version.
pub fn changes(store: &dyn Store, plans: &[HostPlan]) -> BTreeMap<HostName, Changes> {
    plans
        .iter()
        .map(|p| {
            let live = live_version(store, &p.host).map(|(_, m)| m);
            let live_settings = live
                .as_ref()
                .and_then(|m| settings_of_live(store, &p.host, m));
            let c = changes::compare(
                live.as_ref().map(|m| (m, live_settings.as_deref())),
                &p.manifest,
                settings_of_plan(p).as_deref(),
            );
            (p.host.clone(), c)
        })
        .collect()
}

fn settings_of_live(
    store: &dyn Store,
    host: &HostName,
    m: &crate::protocol::manifest::Manifest,
) -> Option<Vec<u8>> {
    let d = changes::settings_digest(m)?;
    store
        .get(host, &Key::Object(d), MAX_SETTINGS_BYTES)
        .ok()
        .flatten()
}

fn settings_of_plan(plan: &HostPlan) -> Option<Vec<u8>> {
    let d = changes::settings_digest(&plan.manifest)?;
    let mut bytes = Vec::new();
    plan.sources
        .get(&d)?
        .open()
        .ok()?
        .read_to_end(&mut bytes)
        .ok()?;
    Some(bytes)
}

#[cfg(test)]
mod tests {

    use super::*;

    use crate::server::publish::{publish_host, Numbering};
    use crate::server::records::Serials;
    use crate::server::store::{Faulty, MemStore};

    fn plan(host: &str, own: &str, secs: u64) -> HostPlan {
        crate::server::publish::fixture::plan(host, &[("configuration.nix", own)], secs)
    }

    #[test]
    fn a_dry_run_decides_as_publish_does_and_makes_no_request_that_writes() {
        let store = MemStore::new();
        let records = tempfile::tempdir().unwrap();
        let serials = Serials::new(records.path());
        let publish = Numbering {
            record: Some(&serials),
            ..Default::default()
        };
        for host in ["alpha", "beta"] {
            publish_host(&store, &plan(host, "v1", 1_790_000_000), &publish).unwrap();
        }
        // A state without serial records (lost, or from before them): publish would
        // write them; a dry run only reads.
        std::fs::remove_file(records.path().join("serials.log")).unwrap();
        let serials = Serials::new(records.path());
        let dry = Numbering {
            record: Some(&serials),
            dry_run: true,
            ..Default::default()
        };
        // Every mutating request fails: the dry run must not make one.
        let faulty = Faulty::new(&store, 0);
        let alpha = report(&faulty, &plan("alpha", "v2", 1_790_000_100), &dry).unwrap();
        assert_eq!(alpha.status, Status::Published);
        assert_eq!(alpha.reason.as_deref(), Some("configuration changed"));
        let live = live_version(&store, &HostName::new("alpha").unwrap()).unwrap();
        assert_eq!(alpha.digest, Some(live.0), "the live version stays live");
        let beta = report(&faulty, &plan("beta", "v1", 1_790_000_100), &dry).unwrap();
        assert_eq!(beta.status, Status::Unchanged);
        assert!(
            !records.path().join("serials.log").exists(),
            "a record was written"
        );
        // And the changes it names are the plan's against the live manifest.
        let c = changes(&faulty, &[plan("alpha", "v2", 1)]);
        let alpha_changes = &c[&HostName::new("alpha").unwrap()];
        assert_eq!(alpha_changes.config.len(), 1);
        assert_eq!(alpha_changes.config[0].path, "configuration.nix");
    }
}
