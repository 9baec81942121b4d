//! The Nix side of prebuilt delivery (docs/delivery.md): which store paths the local store
//! lacks, and importing paths from a local file binary cache with Nix checking every NAR's
//! hash and every narinfo's signature. Nothing here evaluates or builds.
//!
//! Why `nix copy --no-recursive --from file://…` with `require-sigs = true` and
//! `trusted-public-keys` set to exactly the host's `cache_keys`: Nix's local store refuses a
//! non-content-addressed path whose narinfo carries no signature by a trusted key
//! (`require-sigs`, documented in the Nix manual's configuration reference; "cannot add path
//! … because it lacks a valid signature"), and checks the unpacked NAR against the narinfo's
//! `NarHash`. Setting both on the command line overrides a `require-sigs = false` in
//! nix.conf and drops any other trusted key (cache.nixos.org's) for this import. Verified
//! against Debian's Nix 2.8.0: an unsigned or wrongly signed path, a truncated or altered
//! NAR, and a path whose references are not valid are all refused, exit 1.
//! `--no-recursive` makes Nix import exactly the paths given (the caller computed the missing
//! part of the closure), so the local cache needs no narinfo for paths already present.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;

use super::{Nix, NixError, StorePath};

impl Nix {
    /// The subset of `paths` that are valid in the local store.
    pub fn valid_paths(&self, paths: &[StorePath]) -> Result<BTreeSet<StorePath>, NixError> {
        if paths.is_empty() {
            return Ok(BTreeSet::new());
        }
        let mut args = vec!["--check-validity", "--print-invalid"];
        args.extend(paths.iter().map(StorePath::as_str));
        let out = self.run("nix-store", &args)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let invalid: BTreeSet<&str> = text.lines().map(str::trim).collect();
        Ok(paths
            .iter()
            .filter(|p| !invalid.contains(p.as_str()))
            .cloned()
            .collect())
    }

    /// Imports `paths` (and only them) from the file binary cache in `cache`, requiring each
    /// to be signed by one of `keys` (`name:base64`). Returns Nix's log.
    pub fn import_from_cache(
        &self,
        cache: &Path,
        paths: &[StorePath],
        keys: &[String],
    ) -> Result<String, NixError> {
        if paths.is_empty() {
            return Ok(String::new());
        }
        let mut from = OsString::from("file://");
        from.push(cache.as_os_str());
        let mut args: Vec<OsString> = ["copy", "--no-recursive", "--from"]
            .iter()
            .map(OsString::from)
            .collect();
        args.push(from);
        for (k, v) in [
            ("require-sigs", "true".to_owned()),
            ("trusted-public-keys", keys.join(" ")),
            // The local cache's files change between runs under the same URL.
            ("narinfo-cache-positive-ttl", "0".to_owned()),
            ("narinfo-cache-negative-ttl", "0".to_owned()),
        ] {
            args.extend(["--option".into(), k.into(), v.into()]);
        }
        args.extend(paths.iter().map(|p| OsString::from(p.as_str())));
        match self.run("nix", &args) {
            Ok(out) => Ok(out.stderr),
            Err(e) => {
                self.remove_leftovers(paths);
                Err(e)
            }
        }
    }

    /// After a refused import, deletes what Nix left on disk of `paths` without registering
    /// it (an unpacked NAR whose hash did not match stays in /nix/store, invalid, until a
    /// garbage collection; issue #23 item 5). `nix-store --delete` removes an invalid path
    /// and never a valid one that something still uses. Best effort: a failure is logged.
    fn remove_leftovers(&self, paths: &[StorePath]) {
        let valid = match self.valid_paths(paths) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("after a refused import, cannot tell which paths it left: {e}");
                return;
            }
        };
        let left: Vec<&str> = paths
            .iter()
            .filter(|p| !valid.contains(*p))
            .filter(|p| std::fs::symlink_metadata(p.as_str()).is_ok())
            .map(StorePath::as_str)
            .collect();
        if left.is_empty() {
            return;
        }
        let mut args = vec!["--delete"];
        args.extend(&left);
        match self.run("nix-store", &args) {
            Ok(_) => tracing::info!("removed what the refused import left: {}", left.join(" ")),
            Err(e) => tracing::warn!("cannot remove what the refused import left: {e}"),
        }
    }
}
