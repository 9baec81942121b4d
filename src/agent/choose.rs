//! Which source a run follows, among agent.toml's `server` and `mirrors`, and which ones
//! prove the network after activation. The one place that weighs sources against each
//! other: the serial rule and the freshness rule (`agent::fresh`: a source whose stamp ran
//! out is read past, and the run is `stale` only when every source reached is).
//!
//! Invariants: while `server` answers with a version not older than the applied one, no
//! mirror is contacted, so a no-change poll costs what it cost before mirrors existed; the
//! mirrors are read (all of them, in order) only when `server` cannot be reached, stalls, or
//! serves an older serial than the applied version; among the sources read, the highest
//! valid signed serial wins (a tie goes to the earlier in agent.toml); a source serving an
//! older serial than the applied one is skipped with a note, never followed, unless it is
//! `server` and nothing better answered (the apply then refuses it as a replay and reports
//! it, exactly as without mirrors); a stale `server` sends the run to the mirrors as an
//! unreachable one does, and a stale mirror is skipped like an older one.

use super::decide::{replay_refusal, Stamp};
use super::fresh::{self, Known, Verdict};
use super::outcome::{AgentError, RunLog, UpdateOptions};
use super::source::{Connection, Mirrored, Purpose, Reached, RemoteError, ServerUrl};
use super::state::{State, StateDir};
use super::{fetch, live_host};
use crate::protocol::layout;
use crate::protocol::manifest::{Digest, Manifest};
use crate::protocol::{signing, Timestamp};

/// What the run follows.
pub struct Choice {
    /// The sources reached, the chosen one first in line (`source::Mirrored`).
    pub conn: Box<dyn Connection>,
    /// The version the chosen source names.
    pub current: Option<Digest>,
    /// Its manifest's bytes when they were read already.
    pub prefetched: Option<Vec<u8>>,
    /// Set when sources answered but none serves a version at or above the applied one:
    /// the run does nothing, and this says why.
    pub hold: Option<String>,
    /// What the choice skipped and why, for the run's log.
    pub notes: Vec<String>,
    /// Why `server` was not reached, when a mirror was.
    pub server_error: Option<RemoteError>,
    /// The chosen source's freshness verdict on `current`.
    pub fresh: Option<Verdict>,
}

/// One source's answer.
struct Answer {
    reached: Reached,
    current: Option<Digest>,
    prefetched: Option<Vec<u8>>,
    /// The serial and time of the manifest `current` names, when known (for a mirror: and
    /// its signature verified).
    stamp: Option<(u64, Option<Timestamp>)>,
    /// Its freshness verdict on `current` (`agent::fresh`).
    fresh: Option<Verdict>,
}

/// Why `a` is stale, if it is.
fn stale(a: &Answer) -> Option<&str> {
    match &a.fresh {
        Some(Verdict::Stale(why)) => Some(why),
        _ => None,
    }
}

/// Picks the source to follow (see the module's invariants).
pub fn choose(
    opts: &UpdateOptions<'_>,
    dirs: &StateDir,
    state: &State,
) -> Result<Choice, AgentError> {
    let cfg = opts.config;
    let mut notes = Vec::new();
    let mut answers: Vec<Answer> = Vec::new();
    let server_error = match probe(opts, dirs, state, &cfg.server, false) {
        Ok(a) if cfg.mirrors.is_empty() || (older(state, &a).is_none() && stale(&a).is_none()) => {
            return Ok(follow(opts, vec![a], 0, cfg, Vec::new(), None));
        }
        Ok(a) => {
            let why = older(state, &a)
                .or_else(|| stale(&a).map(|w| format!("stale: {w}")))
                .unwrap_or_default();
            notes.push(format!("{}: {why}; reading the mirrors", cfg.server));
            answers.push(a);
            None
        }
        Err(AgentError::Remote(e)) if !cfg.mirrors.is_empty() => {
            notes.push(format!("{}: {e}; trying the mirrors", cfg.server));
            Some(e)
        }
        Err(e) => return Err(e),
    };
    for url in &cfg.mirrors {
        match probe(opts, dirs, state, url, true) {
            Ok(a) => answers.push(a),
            Err(e) => notes.push(format!("mirror {url}: {e}")),
        }
    }
    let mut best: Option<(usize, u64)> = None;
    for (i, a) in answers.iter().enumerate() {
        if a.reached.url == cfg.server {
            continue; // Older, or it would have been followed at once.
        }
        let why_not = match (&a.current, older(state, a)) {
            (None, _) => Some("serves nothing for this host".to_owned()),
            (Some(_), Some(why)) => Some(why),
            (Some(_), None) if a.stamp.is_none() => {
                Some("its manifest is not signed by a trusted key or unreadable".to_owned())
            }
            (Some(_), None) if a.stamp.as_ref().is_some_and(|s| s.0 < cfg.min_serial) => Some(
                format!("its serial is below min_serial = {}", cfg.min_serial),
            ),
            (Some(_), None) if stale(a).is_some() => stale(a).map(|w| format!("stale: {w}")),
            (Some(_), None) => None,
        };
        if let Some(why) = why_not {
            notes.push(format!("mirror {}: {why}; skipped", a.reached.url));
            continue;
        }
        let serial = a.stamp.as_ref().map_or(0, |s| s.0);
        if best.is_none_or(|(_, s)| serial > s) {
            best = Some((i, serial));
        }
    }
    for n in &notes {
        tracing::info!("{n}");
    }
    if let Some((i, _)) = best {
        return Ok(follow(opts, answers, i, cfg, notes, server_error));
    }
    // Nothing better: `server` (older or stale) is followed as without mirrors, and refused
    // or reported stale there.
    if let Some(i) = answers.iter().position(|a| a.reached.url == cfg.server) {
        return Ok(follow(opts, answers, i, cfg, notes, server_error));
    }
    // Every source reached that could be followed is stale: the run says so (nothing
    // changes), rather than "nothing to do", so monitoring on the host sees it.
    if let Some(i) = answers.iter().position(|a| stale(a).is_some()) {
        return Ok(follow(opts, answers, i, cfg, notes, server_error));
    }
    if answers.is_empty() {
        return Err(AgentError::Remote(server_error.unwrap_or_else(|| {
            RemoteError::Connect {
                server: cfg.server.to_string(),
                message: "no source answered".into(),
            }
        })));
    }
    let hold = format!(
        "no source reached serves a version at or above the applied one ({})",
        notes.join("; ")
    );
    let mut choice = follow(opts, answers, 0, cfg, notes, server_error);
    choice.hold = Some(hold);
    Ok(choice)
}

fn follow(
    opts: &UpdateOptions<'_>,
    answers: Vec<Answer>,
    chosen: usize,
    cfg: &super::config::AgentConfig,
    notes: Vec<String>,
    server_error: Option<RemoteError>,
) -> Choice {
    let mut current = None;
    let mut prefetched = None;
    let mut fresh = None;
    let mut reached = Vec::new();
    for (i, a) in answers.into_iter().enumerate() {
        if i == chosen {
            current = a.current;
            prefetched = a.prefetched;
            fresh = a.fresh;
        }
        reached.push(a.reached);
    }
    if reached[chosen].url != cfg.server {
        tracing::info!("following mirror {}", reached[chosen].url);
    }
    Choice {
        conn: Box::new(reports_beside(
            opts,
            Purpose::Fetch,
            Mirrored::new(reached, chosen, &cfg.server),
        )),
        current,
        prefetched,
        hold: None,
        notes,
        server_error,
        fresh,
    }
}

/// Why `a` serves an older version than the applied one, if it does (the replay rule:
/// serials, never clocks).
fn older(state: &State, a: &Answer) -> Option<String> {
    let applied = state.applied.as_ref()?;
    let current = a.current?;
    if current == applied.version {
        return None;
    }
    let (serial, created) = a.stamp.as_ref()?;
    replay_refusal(
        &Stamp {
            version: applied.version,
            serial: applied.serial.unwrap_or(0),
            created: applied.created.as_ref(),
        },
        &Stamp {
            version: current,
            serial: *serial,
            created: created.as_ref(),
        },
    )?;
    Some(format!(
        "version {} (serial {serial}) is older than the applied {} (serial {})",
        current.short(),
        applied.version.short(),
        applied.serial.unwrap_or(0),
    ))
}

/// Reads one source's `current` and what it takes to rank it. `server` costs what a run
/// cost before mirrors (`current`, the host check of `live_host`); a mirror's manifest is
/// also checked against its signature, since its serial decides between sources.
fn probe(
    opts: &UpdateOptions<'_>,
    dirs: &StateDir,
    state: &State,
    url: &ServerUrl,
    mirror: bool,
) -> Result<Answer, AgentError> {
    let cfg = opts.config;
    let mut conn = (opts.connect)(url, Purpose::Fetch)?;
    let current = match fetch::current(conn.as_mut())? {
        None => None,
        Some(text) => Some(
            layout::parse_current(&text)
                .map_err(|_| AgentError::BadCurrent(text.chars().take(100).collect()))?,
        ),
    };
    // Before anything is written to the server (spool, heartbeat, report): an agent
    // configured as another host must not write into this account's logs/.
    let prefetched = match current {
        Some(v) => live_host::check(conn.as_mut(), dirs, &cfg.host, v, &cfg.trusted_keys)?,
        None => None,
    };
    let applied = state.applied.as_ref();
    let stamp = match current {
        Some(v) if applied.is_some_and(|a| a.version == v) => {
            let a = applied.expect("checked");
            Some((a.serial.unwrap_or(0), a.created.clone()))
        }
        Some(v) => {
            let local = std::fs::read(dirs.manifests().join(format!("{v}.json"))).ok();
            let bytes = prefetched.as_deref().or(local.as_deref());
            let manifest = bytes.and_then(|b| Manifest::parse_untrusted(b, &v, &cfg.host).ok());
            match (manifest, bytes) {
                (Some(m), Some(b)) if !mirror || signed(conn.as_mut(), cfg, v, b) => {
                    Some((m.serial, Some(m.created)))
                }
                _ => None,
            }
        }
        None => None,
    };
    let fresh = match current {
        Some(v) => Some(fresh::check(
            conn.as_mut(),
            &cfg.host,
            v,
            &cfg.trusted_keys,
            &known(dirs, state),
            (opts.now)(),
        )?),
        None => None,
    };
    Ok(Answer {
        reached: Reached {
            url: url.clone(),
            conn,
        },
        current,
        prefetched,
        stamp,
        fresh,
    })
}

/// What the agent knows to judge a stamp: the applied version, whether its own signed
/// settings demand a stamp (so a copy of the tree cannot switch the demand off), and the
/// stamp last accepted.
fn known<'a>(dirs: &StateDir, state: &'a State) -> Known<'a> {
    let applied = state.applied.as_ref().map(|a| a.version);
    Known {
        applied,
        window: applied
            .and_then(|v| super::config::snapshot_settings(&dirs.config().join(v.to_hex())))
            .and_then(|s| s.freshness()),
        seen: state.fresh.as_ref(),
    }
}

/// The manifest's signature verifies against `trusted_keys` (or none are configured).
fn signed(
    conn: &mut dyn Connection,
    cfg: &super::config::AgentConfig,
    v: Digest,
    bytes: &[u8],
) -> bool {
    if cfg.trusted_keys.is_empty() {
        return true;
    }
    let Ok(trusted) = signing::parse_trusted(&cfg.trusted_keys) else {
        return false;
    };
    matches!(fetch::signature(conn, v), Ok(Some(sig)) if signing::verify(&trusted, bytes, &sig).is_ok())
}

/// [`reach`], retried every `retry` until `deadline`; `None` when no source answered.
pub fn reach_until(
    opts: &UpdateOptions<'_>,
    deadline: std::time::Instant,
    retry: std::time::Duration,
    log: &mut RunLog<'_>,
) -> Option<Box<dyn Connection>> {
    loop {
        let mut tried = Vec::new();
        let reached = reach(opts, &mut tried);
        for line in &tried {
            log.step(line);
        }
        match reached {
            Ok(c) => return Some(c),
            Err(e) => {
                log.step(&format!("server not reachable: {e}"));
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return None;
                }
                std::thread::sleep(retry.min(left));
            }
        }
    }
}

/// A connection after activation, through the first source on the list that answers (a
/// read of `current` proves the link, whatever the kind of source); the first source's
/// error when none does.
fn reach(
    opts: &UpdateOptions<'_>,
    tried: &mut Vec<String>,
) -> Result<Box<dyn Connection>, RemoteError> {
    let cfg = opts.config;
    let mut first_err = None;
    for url in cfg.sources() {
        let attempt = (opts.connect)(&url, Purpose::Confirm).and_then(|mut c| {
            fetch::current(c.as_mut())?;
            Ok(c)
        });
        match attempt {
            Ok(conn) => {
                if url != cfg.server {
                    tried.push(format!("reached mirror {url}"));
                }
                let reached = vec![Reached { url, conn }];
                let mirrored = Mirrored::new(reached, 0, &cfg.server);
                return Ok(Box::new(reports_beside(opts, Purpose::Confirm, mirrored)));
            }
            Err(e) => {
                if !cfg.mirrors.is_empty() {
                    tried.push(format!("{url}: {e}"));
                }
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.expect("there is always a server"))
}

/// Beside a read-only server, agent.toml's `reports` takes the reports: connected now, so a
/// no-op run's heartbeat reaches it too; when it cannot be reached they stay spooled.
fn reports_beside(opts: &UpdateOptions<'_>, purpose: Purpose, m: Mirrored) -> Mirrored {
    let cfg = opts.config;
    let Some(url) = cfg
        .reports_to
        .as_ref()
        .filter(|_| !cfg.server.takes_reports())
    else {
        return m;
    };
    match (opts.connect)(url, purpose) {
        Ok(conn) => m.with_reports(url.clone(), Some(conn)),
        Err(e) => {
            tracing::warn!("reports {url}: {e}; reports stay spooled");
            m.with_reports(url.clone(), None)
        }
    }
}
