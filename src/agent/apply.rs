//! The typed steps of applying a version, in their order and why:
//! 1. fetch the manifest and the missing objects (bounded, verified, resumable: `fetch`),
//!    and refuse one not signed by a trusted key or older than the applied one (a replay);
//! 2. stage the configuration tree and swap `config/current`;
//! 3. realise the system — before touching any file on the machine, so a failed build
//!    changes nothing: build it, or, when the server built it (`cache/` holds the narinfo
//!    of the manifest's `system`), substitute it from there without evaluating (`substitute`);
//! 4. install `files` entries, point the system profile at the build (not in `test` mode,
//!    which, like `nixos-rebuild test`, leaves the profile and the boot default alone), activate;
//! 5. confirm over a *fresh* connection (the old one may have survived a network the new
//!    system broke) and roll back to the exact store path that ran before if it fails;
//! 6. run the health checks (`checks`): a failing one rolls back the same way, or, with
//!    `on_failure = "keep"`, leaves the new system running and fails the run.
//!
//! Invariant: every change to the machine goes through [`Host`]; once anything was changed,
//! a failure puts back the previous system by its store path (and its files).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::checks::{self, Baseline};
use super::config::AgentConfig;
use super::decide::{replay_refusal, Stamp};
use super::fetch;
use super::files;
use super::host::{Host, Realise};
use super::outcome::{AttemptError, RunLog, UpdateOptions};
use super::source::{Connection, RemoteError};
use super::state::StateDir;
use super::substitute::{self, SubstituteError};
use crate::nix::locate::{self, SourceMap};
use crate::nix::Target;
use crate::protocol::check::{CheckResult, OnFailure};
use crate::protocol::manifest::{Build, ConfigEntry, Digest, Manifest};
use crate::protocol::report::{Outcome, Timings};
use crate::protocol::settings::HostSettings;
use crate::protocol::{signing, Mode, StorePath, Timestamp};

/// The trusted keys and the signature read before the manifest, to verify it once read.
type Signed = (Vec<ssh_key::PublicKey>, Vec<u8>);

/// Pause between attempts to reach the server after activation.
const CONFIRM_RETRY: Duration = Duration::from_secs(2);

/// One try at a version: what it learned on the way, for the report and the state.
pub struct Attempt<'a> {
    pub cfg: &'a AgentConfig,
    pub dirs: &'a StateDir,
    pub host: &'a dyn Host,
    pub version: Digest,
    pub running: Option<StorePath>,
    pub built: Option<StorePath>,
    pub reboot_required: bool,
    /// The new manifest's `created` time, once fetched.
    pub created: Option<Timestamp>,
    /// The applied manifest's `created` time (replay protection).
    pub applied_created: Option<Timestamp>,
    /// The new manifest's `serial` once fetched (`None` for one from before serials).
    pub serial: Option<u64>,
    /// The applied manifest's `serial` (replay protection).
    pub applied_serial: Option<u64>,
    /// The settings that came with the version (bento-host.json).
    pub settings: Option<HostSettings>,
    /// The version applied before this run (whose files a rollback puts back).
    pub previous: Option<Digest>,
    /// Targets of the files installed on the machine now; the record keeps them in the state.
    pub installed: Vec<String>,
    /// The health checks' results, once they ran (for the report).
    pub checks: Vec<CheckResult>,
    /// A connection made after activation reached the server (so the report can go at once,
    /// even after a rollback a failed check caused).
    pub confirmed: bool,
    /// The manifest's time disagrees with this machine's clock (the report carries it).
    pub clock_warning: Option<String>,
}

fn failed(e: &dyn std::fmt::Display) -> AttemptError {
    AttemptError::Failed(e.to_string())
}

impl Attempt<'_> {
    /// A published version: fetch, stage, then [`Attempt::apply`].
    /// `prefetched`: the manifest's bytes when the run read them already (`live_host`).
    pub fn run(
        &mut self,
        conn: &mut Box<dyn Connection>,
        prefetched: Option<Vec<u8>>,
        opts: &UpdateOptions<'_>,
        log: &mut RunLog<'_>,
        timings: &mut Timings,
    ) -> Result<Outcome, AttemptError> {
        let t = Instant::now();
        // The signature before the manifest: an unsigned or foreign-signed one costs a
        // signature's read, not the manifest's (issue #23 item 11).
        let signature = self.signature_first(conn.as_mut(), log)?;
        let bytes = match prefetched {
            Some(bytes) => bytes,
            None => fetch::manifest(conn.as_mut(), self.version).map_err(|e| match e {
                // A refusal, not an interruption: the report says so.
                RemoteError::TooLarge { .. } => failed(&e),
                e => AttemptError::Remote(e),
            })?,
        };
        let mut manifest = Manifest::parse_untrusted(&bytes, &self.version, &self.cfg.host)
            .map_err(|e| AttemptError::Failed(format!("manifest {}: {e}", self.version.short())))?;
        self.check_trust(signature, &bytes, &manifest, log)?;
        let packed_error = |e: super::packed::PackedError| match e {
            super::packed::PackedError::Remote(e @ RemoteError::BadObject { .. }) => failed(&e),
            super::packed::PackedError::Remote(e) => AttemptError::Remote(e),
            super::packed::PackedError::Refused(why) => {
                AttemptError::Failed(format!("version {}: {why}", self.version.short()))
            }
        };
        // Format 2: the trees the signed manifest names, before anything else is fetched.
        super::packed::expand(conn.as_mut(), &mut manifest, &self.dirs.objects())
            .map_err(packed_error)?;
        if let Some(w) =
            super::decide::clock_warning(&manifest.created, std::time::SystemTime::now())
        {
            log.warn(&format!("warning: {w}"));
            self.clock_warning = Some(w);
        }
        self.created = Some(manifest.created.clone());
        self.serial = (manifest.serial > 0).then_some(manifest.serial);
        let mpath = self.dirs.manifests().join(format!("{}.json", self.version));
        crate::sys::atomic::write_file(&mpath, &bytes, 0o600).map_err(|e| failed(&e))?;
        let sizes: BTreeMap<Digest, u64> = manifest
            .config
            .iter()
            .filter_map(|e| match e {
                ConfigEntry::File { sha256, size, .. } => Some((*sha256, *size)),
                _ => None,
            })
            .chain(manifest.files.iter().map(|f| (f.sha256, f.size)))
            .collect();
        let missing: Vec<(Digest, u64)> = sizes
            .iter()
            .filter(|(d, _)| !self.dirs.objects().join(d.to_hex()).exists())
            .map(|(d, s)| (*d, *s))
            .collect();
        log.step(&format!(
            "fetching {} of {} objects",
            missing.len(),
            sizes.len()
        ));
        let (whole, from_packs) =
            super::packed::fetch_packed(conn.as_mut(), &manifest, &missing, &self.dirs.objects())
                .map_err(packed_error)?;
        match fetch::objects(conn.as_mut(), &whole, &self.dirs.objects()) {
            Ok(n) => log.step(&format!(
                "fetched {}",
                crate::sys::output::bytes(n + from_packs)
            )),
            Err(e @ RemoteError::BadObject { .. }) => return Err(failed(&e)),
            Err(e) => return Err(AttemptError::Remote(e)),
        }
        timings.fetch_ms = Some(t.elapsed().as_millis() as u64);

        let config_dir = files::stage_config(
            &manifest,
            &self.version,
            &self.dirs.objects(),
            &self.dirs.config(),
        )
        .map_err(|e| failed(&e))?;
        self.settings = super::config::snapshot_settings(&config_dir);
        let target = match manifest.build {
            Build::Flake => Target::Flake {
                dir: config_dir.clone(),
                host: self.cfg.host.to_string(),
            },
            Build::Classic => Target::Classic {
                dir: config_dir.clone(),
            },
        };
        let how =
            match substitute::prebuilt(conn.as_mut(), &manifest).map_err(AttemptError::Remote)? {
                None => Realise::Build(target),
                Some(system) => self.prebuilt(conn.as_mut(), &system, log)?,
            };
        self.apply(&how, Some(&manifest), conn, opts, log, timings)
    }

    /// A system the server built: fetch what the store lacks of it (verified), without
    /// evaluating anything; nothing on the machine changes here.
    fn prebuilt(
        &self,
        conn: &mut dyn Connection,
        system: &StorePath,
        log: &mut RunLog<'_>,
    ) -> Result<Realise, AttemptError> {
        log.step(&format!(
            "{system} is prebuilt by the server: substituting it from cache/, not evaluating"
        ));
        let cache = self.dirs.nix_cache();
        let mut step = |line: &str| log.step(line);
        match substitute::prepare(
            conn,
            self.host,
            &self.cfg.cache_keys,
            system,
            &cache,
            &mut step,
        ) {
            Ok(p) => {
                log.step(&format!(
                    "fetched {} of NARs for {} path(s)",
                    crate::sys::output::bytes(p.nar_bytes),
                    p.narinfos
                ));
                Ok(p.realise)
            }
            Err(SubstituteError::Remote(e)) => Err(AttemptError::Remote(e)),
            Err(e) => Err(AttemptError::Failed(format!(
                "prebuilt system refused: {e}"
            ))),
        }
    }

    /// Realises the system, installs the manifest's files (a published version), activates
    /// and confirms, rolling back on a lost server.
    pub fn apply(
        &mut self,
        how: &Realise,
        manifest: Option<&Manifest>,
        conn: &mut Box<dyn Connection>,
        opts: &UpdateOptions<'_>,
        log: &mut RunLog<'_>,
        timings: &mut Timings,
    ) -> Result<Outcome, AttemptError> {
        let effective = self.cfg.effective(self.settings.as_ref());

        let t = Instant::now();
        let substitute = matches!(how, Realise::Substitute { .. });
        log.step(if substitute { "importing" } else { "building" });
        let built = match self.host.realise(how) {
            Ok(b) => b,
            Err(e) => {
                log.output(e.log());
                timings.build_ms = Some(t.elapsed().as_millis() as u64);
                return Err(AttemptError::Failed(format!(
                    "{} failed: {}",
                    if substitute { "import" } else { "build" },
                    realise_error(&e, how, manifest)
                )));
            }
        };
        if let Realise::Substitute { cache, .. } = how {
            substitute::prune(cache);
        }
        log.output(&built.log);
        timings.build_ms = Some(t.elapsed().as_millis() as u64);
        log.step(&format!(
            "{} {}",
            if substitute { "substituted" } else { "built" },
            built.path
        ));
        self.built = Some(built.path.clone());
        if let Some(expected) = manifest.and_then(|m| m.system.as_ref()) {
            if expected != &built.path {
                log.step(&format!("note: the server expected {expected}"));
            }
        }
        let mode = effective.mode;
        // A `test` activation leaves the boot default alone: a reboot would only bring back
        // the old system (and the next run would activate and reboot again, forever).
        let booted = self.host.booted().or_else(|| self.running.clone());
        self.reboot_required = mode != Mode::Test
            && booted
                .as_ref()
                .is_some_and(|r| self.host.boot_files_differ(r, &built.path));

        if let Some(manifest) = manifest {
            self.installed = files::install_files(
                &manifest.files,
                &self.dirs.objects(),
                &self.cfg.files_root,
                &self.installed,
                &self.cfg.identity_file,
            )
            .map_err(|e| failed(&e))?;
            self.persist_installed().map_err(|e| failed(&e))?;
        }

        if self.running.as_ref() == Some(&built.path) {
            log.step("the build is the running system: nothing to activate");
            if !mode.activates_now() {
                return Ok(Outcome::Success);
            }
            // Still checked: a version whose checks failed with `on_failure = "keep"` is
            // running, and must not count as a success when it is tried again.
            let nothing = Baseline::Skip("nothing was activated".into());
            return self.health(&nothing, &effective, false, log, timings, mode);
        }
        let baseline = if mode.activates_now() {
            Baseline::before_switch(self.host)
        } else {
            Baseline::Skip("not activated now".into())
        };
        let t = Instant::now();
        log.step(&format!("activating ({})", mode.as_str()));
        set_profile_unless_test(self.host, &built.path, mode).map_err(|e| failed(&e))?;
        match self.host.activate(&built.path, mode) {
            Ok(out) => log.output(&out),
            Err(e) => {
                log.output(&e.output);
                let restored = self.restore(log, mode);
                timings.activate_ms = Some(t.elapsed().as_millis() as u64);
                return Err(AttemptError::Failed(format!(
                    "activation failed ({}){restored}",
                    e.status
                )));
            }
        }
        timings.activate_ms = Some(t.elapsed().as_millis() as u64);
        if !mode.activates_now() {
            return Ok(Outcome::Success);
        }
        self.confirm(conn, opts, log, timings, mode)?;
        self.health(&baseline, &effective, true, log, timings, mode)
    }

    /// Runs the health checks, retried until `confirm_timeout`; on a failure rolls back (when
    /// this run activated something and a system ran before) or keeps the new system, as
    /// `on_failure` says.
    fn health(
        &mut self,
        baseline: &Baseline,
        settings: &HostSettings,
        activated: bool,
        log: &mut RunLog<'_>,
        timings: &mut Timings,
        mode: Mode,
    ) -> Result<Outcome, AttemptError> {
        let t = Instant::now();
        self.checks = checks::run(
            self.host,
            &settings.checks,
            baseline,
            self.cfg.confirm_timeout,
            checks::RETRY,
            log,
        );
        timings.checks_ms = Some(t.elapsed().as_millis() as u64);
        let Some(failed) = checks::failures(&self.checks) else {
            return Ok(Outcome::Success);
        };
        match settings.on_failure {
            OnFailure::Keep => Err(AttemptError::Failed(format!(
                "{failed}; on_failure = \"keep\": the new system stays"
            ))),
            OnFailure::Rollback if activated && self.running.is_some() => {
                let restored = self.restore(log, mode);
                Err(AttemptError::RolledBack(format!("{failed}{restored}")))
            }
            OnFailure::Rollback if activated => Err(AttemptError::Failed(format!(
                "{failed}; there is no earlier system to go back to"
            ))),
            OnFailure::Rollback => Err(AttemptError::Failed(format!(
                "{failed}; nothing was activated, so nothing to roll back"
            ))),
        }
    }

    /// Proves the server is still reachable over a connection made after activation; rolls
    /// back to the system that ran before when it is not.
    fn confirm(
        &mut self,
        conn: &mut Box<dyn Connection>,
        opts: &UpdateOptions<'_>,
        log: &mut RunLog<'_>,
        timings: &mut Timings,
        mode: Mode,
    ) -> Result<Outcome, AttemptError> {
        let t = Instant::now();
        log.step("checking that the server is still reachable");
        let deadline = Instant::now() + self.cfg.confirm_timeout;
        // Any source on the list proves the network: a host whose server is down but whose
        // mirror answers keeps its new system.
        let fresh = super::choose::reach_until(opts, deadline, CONFIRM_RETRY, log);
        timings.confirm_ms = Some(t.elapsed().as_millis() as u64);
        match fresh {
            Some(c) => {
                let old = std::mem::replace(conn, c);
                let _ = old.close();
                self.confirmed = true;
                Ok(Outcome::Success)
            }
            None if self.running.is_some() => {
                let restored = self.restore(log, mode);
                Err(AttemptError::RolledBack(format!(
                    "server unreachable for {} after activation{restored}",
                    humantime::format_duration(self.cfg.confirm_timeout)
                )))
            }
            None => Err(AttemptError::Failed(
                "server unreachable after activation, and there is no earlier system to go back to"
                    .into(),
            )),
        }
    }

    /// With `trusted_keys`, reads the signature before the manifest and refuses, without
    /// downloading the manifest, one that is missing, malformed, for another namespace or by
    /// no trusted key. Returns the keys and the signature for [`Attempt::check_trust`].
    fn signature_first(
        &self,
        conn: &mut dyn Connection,
        log: &mut RunLog<'_>,
    ) -> Result<Option<Signed>, AttemptError> {
        if self.cfg.trusted_keys.is_empty() {
            log.step("note: no trusted_keys configured; the manifest's signature is not checked");
            return Ok(None);
        }
        let short = self.version.short();
        let trusted = signing::parse_trusted(&self.cfg.trusted_keys)
            .map_err(|e| AttemptError::Failed(e.to_string()))?;
        let sig = match fetch::signature(conn, self.version) {
            Ok(Some(sig)) => sig,
            Ok(None) => {
                return Err(AttemptError::Failed(format!(
                    "manifest {short} is not signed; refusing it (not downloaded)"
                )));
            }
            Err(RemoteError::TooLarge { limit, .. }) => {
                return Err(AttemptError::Failed(format!(
                    "manifest {short}: its signature is over {limit} bytes; refusing it (not downloaded)"
                )));
            }
            Err(e) => return Err(AttemptError::Remote(e)),
        };
        signing::check_signer(&trusted, &sig).map_err(|e| {
            AttemptError::Failed(format!(
                "manifest {short}: {e}; refusing it (not downloaded)"
            ))
        })?;
        Ok(Some((trusted, sig)))
    }

    /// Refuses a manifest not signed by a trusted key (when keys are configured), one below
    /// agent.toml's `min_serial`, and one older than the version already applied (a replay).
    fn check_trust(
        &self,
        signature: Option<Signed>,
        bytes: &[u8],
        manifest: &Manifest,
        log: &mut RunLog<'_>,
    ) -> Result<(), AttemptError> {
        let short = self.version.short();
        if let Some((trusted, sig)) = signature {
            signing::verify(&trusted, bytes, &sig)
                .map_err(|e| AttemptError::Failed(format!("manifest {short}: {e}")))?;
            log.step("signature verified");
        }
        let floor = self.cfg.min_serial;
        if manifest.serial < floor {
            return Err(AttemptError::Failed(format!(
                "manifest {short} has serial {}, below min_serial = {floor} in agent.toml: an older version than this machine was installed with; refusing it",
                manifest.serial
            )));
        }
        if let Some(previous) = self.previous {
            let applied = Stamp {
                version: previous,
                serial: self.applied_serial.unwrap_or(0),
                created: self.applied_created.as_ref(),
            };
            let new = Stamp {
                version: self.version,
                serial: manifest.serial,
                created: Some(&manifest.created),
            };
            if let Some(why) = replay_refusal(&applied, &new) {
                return Err(AttemptError::Failed(why));
            }
        }
        Ok(())
    }

    /// Records the installed targets at once, so a run killed before it ends still leaves
    /// the next one knowing which files are on the machine.
    fn persist_installed(&self) -> std::io::Result<()> {
        let mut on_disk = self.dirs.load()?;
        on_disk.installed_files = self.installed.clone();
        self.dirs.save(&on_disk)
    }

    /// Puts back the `files` entries of the applied version (a published attempt installed
    /// its own before activating).
    fn restore_files(&mut self, log: &mut RunLog<'_>) {
        let Some(previous) = self.previous.filter(|p| *p != self.version) else {
            return;
        };
        let path = self.dirs.manifests().join(format!("{previous}.json"));
        let Some(manifest) = std::fs::read(&path)
            .ok()
            .and_then(|b| Manifest::parse(&b).ok())
        else {
            log.step(
                "note: the previous version's files could not be restored (its manifest is gone)",
            );
            return;
        };
        match files::install_files(
            &manifest.files,
            &self.dirs.objects(),
            &self.cfg.files_root,
            &self.installed,
            &self.cfg.identity_file,
        ) {
            Ok(installed) => {
                self.installed = installed;
                if let Err(e) = self.persist_installed() {
                    log.step(&format!("note: cannot record the restored files: {e}"));
                }
            }
            Err(e) => log.step(&format!(
                "note: restoring the previous version's files failed: {e}"
            )),
        }
    }

    /// Puts back the system that ran before this run, by its store path.
    fn restore(&mut self, log: &mut RunLog<'_>, mode: Mode) -> String {
        let Some(prev) = self.running.clone() else {
            return String::new();
        };
        log.step(&format!("going back to {prev}"));
        self.restore_files(log);
        let prev = &prev;
        if let Err(e) = set_profile_unless_test(self.host, prev, mode) {
            log.step(&format!("could not reset the profile: {e}"));
            return format!(
                "; restoring {prev} failed: {}",
                first_error_line(&e.to_string())
            );
        }
        match self.host.activate(prev, mode) {
            Ok(out) => {
                log.output(&out);
                format!("; back on {prev}")
            }
            Err(e) => {
                log.output(&e.output);
                format!("; re-activating {prev} failed too ({})", e.status)
            }
        }
    }
}

/// Points the system profile at `path`, except in `test` mode: like `nixos-rebuild test`,
/// that mode runs a system without adding a generation or changing the boot default.
fn set_profile_unless_test(
    host: &dyn Host,
    path: &StorePath,
    mode: Mode,
) -> Result<(), crate::nix::NixError> {
    if mode == Mode::Test {
        return Ok(());
    }
    host.set_profile(path)
}

/// A failed realisation in one line, with the file and line Nix named, as a path of the
/// configuration tree (`flake.nix:3:5`), not of the staged copy or its `/nix/store/…-source`
/// copy, which mean nothing to the person fixing it.
fn realise_error(e: &crate::nix::NixError, how: &Realise, manifest: Option<&Manifest>) -> String {
    let fallback = first_error_line(&e.to_string());
    let (Realise::Build(target), Some(manifest)) = (how, manifest) else {
        return fallback;
    };
    let dir = match target {
        Target::Flake { dir, .. } | Target::Classic { dir } => dir,
    };
    let tree = manifest.config.iter().map(|c| {
        let p = c.path().as_str().to_owned();
        (p.clone(), p)
    });
    let map = SourceMap::new(tree, "").with_root(dir);
    locate::summary(&map.rewrite(e.log()), &map.rewrite(&fallback))
}

pub fn first_error_line(text: &str) -> String {
    text.lines()
        .find(|l| l.contains("error"))
        .or_else(|| text.lines().next())
        .unwrap_or_default()
        .trim()
        .to_owned()
}
