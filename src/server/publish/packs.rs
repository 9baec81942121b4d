//! Format 2 on the publisher (issue #26, `[server] format = 2`): turns each plan's file
//! list into trees and packs, and gives each tree and pack a source, so the rest of publish
//! stores them as it stores any object. A pack's name is the hash of its bytes, and those
//! bytes follow from the files it packs (their digests, in order), so the publisher
//! remembers "these files pack to this digest" (`<state>/packs`) and a later run names an
//! unchanged pack without reading a file. Invariant: a remembered name is only ever a
//! function of the files' digests, so it can never name other bytes; a store that lacks
//! the pack gets it read from its files and verified against that name.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{HostPlan, PublishError};
use crate::protocol::manifest::Digest;
use crate::protocol::pack::PackWriter;
use crate::server::hostfiles::Source;

/// The file, in the publisher's state directory, of what earlier runs named.
pub const MEMO: &str = "packs";

/// Makes every plan format 2 (in parallel); a plan that cannot be packed (a file changed or
/// unreadable since the scan) becomes a failed report made by `failed`.
pub fn pack_all(
    packer: &Packer,
    plans: Vec<HostPlan>,
    failed: impl Fn(&crate::protocol::HostName, PublishError) -> super::HostReport + Sync,
) -> (Vec<HostPlan>, Vec<super::HostReport>) {
    use rayon::prelude::*;
    let done: Vec<Result<HostPlan, Box<super::HostReport>>> = plans
        .into_par_iter()
        .map(|mut plan| match packer.pack(&mut plan) {
            Ok(()) => Ok(plan),
            Err(e) => Err(Box::new(failed(&plan.host, e))),
        })
        .collect();
    let mut plans = Vec::new();
    let mut reports = Vec::new();
    for d in done {
        match d {
            Ok(p) => plans.push(p),
            Err(r) => reports.push(*r),
        }
    }
    (plans, reports)
}

/// The publisher's memory of pack names, shared by the hosts of one run.
pub struct Packer {
    path: PathBuf,
    /// What earlier runs named: a chunk's key to its pack.
    known: HashMap<Digest, Digest>,
    /// What this run named: a chunk's key to its pack.
    run: Mutex<HashMap<Digest, Digest>>,
    /// Every pack named in this run, with where its bytes come from: a host whose subtree
    /// another host built (`subtrees`) uses packs it did not name itself.
    sources: Mutex<HashMap<Digest, Source>>,
    /// Subtrees built in this run: hosts sharing `common/` build its trees once.
    subtrees: crate::protocol::tree::Subtrees,
}

/// The key of a chunk: what its pack's bytes are a function of.
fn chunk_key(files: &[(Digest, u64)]) -> Digest {
    let mut raw = Vec::with_capacity(files.len() * 32);
    for (d, _) in files {
        raw.extend_from_slice(d.as_bytes());
    }
    Digest::of(&raw)
}

impl Packer {
    /// Reads what earlier runs remembered; a missing or damaged file is an empty memory
    /// (packs are then named by reading their files again).
    pub fn load(path: PathBuf) -> Self {
        let known = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.parse().ok()?, v.parse().ok()?))
            })
            .collect();
        Self {
            path,
            known,
            run: Mutex::new(HashMap::new()),
            sources: Mutex::new(HashMap::new()),
            subtrees: Default::default(),
        }
    }

    /// Makes `plan`'s manifest format 2 and adds its trees' and packs' sources.
    pub fn pack(&self, plan: &mut HostPlan) -> Result<(), PublishError> {
        let sources = &plan.sources;
        plan.manifest.store_as_trees(
            |files| {
                let key = chunk_key(files);
                if let Some(pack) = self.run.lock().expect("packer").get(&key) {
                    return Ok(*pack);
                }
                let mut seen = std::collections::BTreeSet::new();
                let mut parts: Vec<(Digest, Source)> = Vec::new();
                for (d, _) in files.iter().filter(|(d, _)| seen.insert(*d)) {
                    let source = sources.get(d).ok_or_else(|| {
                        PublishError::Internal(format!("no source for object {d}"))
                    })?;
                    parts.push((*d, source.clone()));
                }
                let (pack, source) = match self.known.get(&key) {
                    Some(pack) => {
                        let files = parts.into_iter().map(|(_, s)| s).collect();
                        (*pack, Source::Pack(files))
                    }
                    None => read_pack(&parts)?,
                };
                // The source first: another host's build that finds the pack in `run`
                // looks for its source at once (a window that failed one test run).
                self.sources.lock().expect("packer").insert(pack, source);
                self.run.lock().expect("packer").insert(key, pack);
                Ok::<_, PublishError>(pack)
            },
            &self.subtrees,
        )?;
        let stored = plan.manifest.stored().expect("just built");
        for (d, bytes) in &stored.trees {
            plan.sources.insert(*d, Source::Bytes(Arc::clone(bytes)));
        }
        let named = self.sources.lock().expect("packer");
        for pack in stored.packs.keys() {
            let source = named
                .get(pack)
                .ok_or_else(|| PublishError::Internal(format!("no source for pack {pack}")))?;
            plan.sources.insert(*pack, source.clone());
        }
        Ok(())
    }

    /// Saves what this run named (and, when it planned only some hosts, what it kept
    /// from before), atomically.
    pub fn save(&self, every_host: bool) -> io::Result<()> {
        let run = self.run.lock().expect("packer");
        let mut all: BTreeMap<Digest, Digest> = run.iter().map(|(k, v)| (*k, *v)).collect();
        if !every_host {
            all.extend(self.known.iter().map(|(k, v)| (*k, *v)));
        }
        if all.len() == self.known.len() && all.iter().all(|(k, v)| self.known.get(k) == Some(v)) {
            return Ok(());
        }
        let text: String = all.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
        crate::sys::atomic::write_file(&self.path, text.as_bytes(), 0o600)
    }
}

/// A pack read from its files (each distinct content once, in order), each checked against
/// its digest: a file changed since the scan fails the host naming it, as an unpacked
/// object would. Its name and its bytes.
fn read_pack(parts: &[(Digest, Source)]) -> Result<(Digest, Source), PublishError> {
    let mut pack = PackWriter::default();
    for (digest, source) in parts {
        let mut bytes = Vec::new();
        source
            .open()
            .and_then(|mut r| r.read_to_end(&mut bytes))
            .map_err(|e| PublishError::Io {
                path: source.describe(),
                source: e,
            })?;
        if pack.add(&bytes) != *digest {
            return Err(PublishError::ChangedWhilePublishing(source.describe()));
        }
    }
    let (bytes, index) = pack.finish();
    Ok((index.pack, Source::Bytes(bytes.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(files: &[(&str, &str)]) -> HostPlan {
        crate::server::publish::fixture::plan("alpha", files, 1)
    }

    fn read(source: &Source) -> Vec<u8> {
        let mut out = Vec::new();
        source.open().unwrap().read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn every_tree_and_pack_gets_a_source_holding_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let packer = Packer::load(dir.path().join("packs"));
        let mut plan = plan_of(&[("a.nix", "{ a = 1; }"), ("b.nix", "{ b = 2; }")]);
        packer.pack(&mut plan).unwrap();
        assert_eq!(
            plan.manifest.format,
            crate::protocol::manifest::FORMAT_TREES
        );
        for d in plan.manifest.objects() {
            let source = plan.sources.get(&d).expect("a source for every object");
            assert_eq!(Digest::of(&read(source)), d);
        }
    }

    #[test]
    fn hosts_sharing_a_directory_each_get_a_source_for_every_object() {
        let dir = tempfile::tempdir().unwrap();
        let packer = Packer::load(dir.path().join("packs"));
        let shared = [
            ("common/a.nix", "{ a = 1; }"),
            ("common/b.nix", "{ b = 2; }"),
        ];
        for host in ["alpha", "beta"] {
            let mut files = shared.to_vec();
            let own = format!("{{ host = \"{host}\"; }}");
            files.push(("own.nix", &own));
            let mut plan = crate::server::publish::fixture::plan(host, &files, 1);
            plan.manifest
                .config
                .push(crate::protocol::manifest::ConfigEntry::Directory {
                    path: crate::protocol::manifest::RelPath::new("common").unwrap(),
                });
            plan.manifest.canonicalize();
            packer.pack(&mut plan).unwrap();
            for d in plan.manifest.objects() {
                let source = plan.sources.get(&d).expect("a source for every object");
                assert_eq!(Digest::of(&read(source)), d, "{host}");
            }
        }
    }

    #[test]
    fn a_file_changed_since_the_scan_fails_its_host_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let packer = Packer::load(dir.path().join("packs"));
        let mut plan = plan_of(&[("a.nix", "{ a = 1; }"), ("b.nix", "{ b = 2; }")]);
        let path = dir.path().join("b.nix");
        std::fs::write(&path, "{ b = 'edited'; }").unwrap();
        plan.sources.insert(
            Digest::of(b"{ b = 2; }"),
            Source::File(Arc::from(path.as_path())),
        );
        match packer.pack(&mut plan) {
            Err(PublishError::ChangedWhilePublishing(p)) => assert_eq!(p, path),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_remembered_pack_is_named_without_reading_and_read_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let memo = dir.path().join("packs");
        let files = [("a.nix", "{ a = 1; }"), ("b.nix", "{ b = 2; }")];
        let first = Packer::load(memo.clone());
        let mut plan = plan_of(&files);
        first.pack(&mut plan).unwrap();
        first.save(true).unwrap();
        let packs: Vec<Digest> = plan
            .manifest
            .stored()
            .unwrap()
            .packs
            .keys()
            .copied()
            .collect();

        let second = Packer::load(memo);
        let mut again = plan_of(&files);
        second.pack(&mut again).unwrap();
        for p in &packs {
            let source = &again.sources[p];
            assert!(matches!(source, Source::Pack(_)), "named from memory");
            assert_eq!(
                Digest::of(&read(source)),
                *p,
                "and its files make the named bytes"
            );
        }
    }
}
