//! The state of one host, as a pure function of what the server published and what the
//! host last said (heartbeat, newest report), the time and the host's polling interval. No
//! file timestamps: a host that reports version N while N+1 is being published compares its
//! digest with the live one and is `update pending`, never `up to date`.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::nix::StorePath;
use crate::protocol::manifest::Digest;
use crate::protocol::report::{Heartbeat, Outcome, Report};

/// A host is silent after this many polling intervals without a heartbeat.
pub const SILENT_AFTER_INTERVALS: u32 = 3;

/// What `bento status` says about a host. The JSON names are a stable interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    // Declared in table order: problems first.
    // What bento could not read decides nothing: shown as such, never as `new`.
    Unknown,
    Failing,
    RolledBack,
    Silent,
    /// The host's source offers no freshness stamp for its live version (`[server]
    /// freshness`): it changes nothing and may be kept from newer versions.
    Stale,
    Drifted,
    UpdatePending,
    New,
    // rollout (#13): `hold = true` in bento.toml; set by server/rollout.rs `annotate`, never by `assess`.
    Held,
    UpToDate,
}

impl State {
    pub const ALL: [State; 10] = [
        State::Unknown,
        State::Failing,
        State::RolledBack,
        State::Silent,
        State::Stale,
        State::Drifted,
        State::UpdatePending,
        State::New,
        State::Held,
        State::UpToDate,
    ];

    /// The words of the table.
    pub fn label(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::UpToDate => "up to date",
            State::UpdatePending => "update pending",
            State::Failing => "failing",
            State::RolledBack => "rolled back",
            State::Drifted => "drifted",
            State::New => "new",
            State::Silent => "silent",
            State::Stale => "stale",
            State::Held => "held",
        }
    }

    /// The JSON and metrics name (kebab-case).
    pub fn key(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::UpToDate => "up-to-date",
            State::UpdatePending => "update-pending",
            State::Failing => "failing",
            State::RolledBack => "rolled-back",
            State::Drifted => "drifted",
            State::New => "new",
            State::Silent => "silent",
            State::Stale => "stale",
            State::Held => "held",
        }
    }

    /// States that make `bento status` exit non-zero: the host needs a person.
    pub fn is_alarm(self) -> bool {
        matches!(
            self,
            State::Failing | State::RolledBack | State::Silent | State::Stale
        )
    }
}

/// The live version of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub digest: Digest,
    pub created: SystemTime,
}

/// Everything the state depends on.
#[derive(Debug, Clone, Default)]
pub struct Facts<'a> {
    pub published: Option<Published>,
    /// What the published version builds to (manifest `system`, else `bento build`'s record).
    pub expected: Option<&'a StorePath>,
    pub heartbeat: Option<&'a Heartbeat>,
    pub latest: Option<&'a Report>,
}

/// A state and, for problems, one line saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    pub state: State,
    pub reason: Option<String>,
}

impl Assessment {
    fn new(state: State) -> Self {
        Self {
            state,
            reason: None,
        }
    }

    fn because(state: State, reason: impl Into<String>) -> Self {
        Self {
            state,
            reason: Some(reason.into()),
        }
    }
}

/// Parses an RFC 3339 time written by a host; `None` when it is not one.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text).ok()
}

/// When the host was last heard from: its newest heartbeat or report.
pub fn last_seen(facts: &Facts<'_>) -> Option<SystemTime> {
    let hb = facts.heartbeat.map(|h| h.time.system_time());
    let rep = facts.latest.map(|r| r.finished.system_time());
    hb.max(rep)
}

/// A short duration for messages: `45s`, `12m`, `3h`, `2d`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The state of a host at `now`, given its polling `interval`.
pub fn assess(facts: &Facts<'_>, now: SystemTime, interval: Duration) -> Assessment {
    assess_received(facts, now, interval, None)
}

/// [`assess`], judging liveness by `received` (when the server received the host's newest
/// file, by the server's clock) when it is known: a host whose own clock is wrong is never
/// silent for it.
pub fn assess_received(
    facts: &Facts<'_>,
    now: SystemTime,
    interval: Duration,
    received: Option<SystemTime>,
) -> Assessment {
    let (hb, latest) = (facts.heartbeat, facts.latest);
    if hb.is_none() && latest.is_none() {
        return Assessment::new(State::New);
    }
    // A host that wrote files whose times cannot be read is as good as silent.
    let seen = received.or_else(|| last_seen(facts));
    let quiet = seen.map(|t| now.duration_since(t).unwrap_or_default());
    let limit = interval * SILENT_AFTER_INTERVALS;
    match quiet {
        None => return Assessment::because(State::Silent, "its heartbeat has no readable time"),
        Some(q) if q > limit => {
            return Assessment::because(
                State::Silent,
                format!(
                    "no heartbeat for {} (polls every {})",
                    short_duration(q),
                    short_duration(interval)
                ),
            )
        }
        Some(_) => {}
    }

    // The host's own word that its source is stale, from its newest heartbeat: what it
    // reads may be a copy that stopped following this server.
    if let Some(why) = hb.and_then(|h| h.stale.as_deref()) {
        return Assessment::because(State::Stale, one_line(Some(why)));
    }

    let running_version = hb.and_then(|h| h.version);
    let running_system = hb.and_then(|h| h.system.as_deref());
    let Some(published) = &facts.published else {
        return Assessment::because(State::UpdatePending, "nothing is published for it yet");
    };
    // The newest attempt, if it was at the live version (a failed self-update is not: the
    // host still runs the published version).
    let attempt = latest.filter(|r| {
        r.version == published.digest && r.kind == crate::protocol::report::RunKind::Published
    });
    // A heartbeat older than the report it follows has not caught up yet: trust the report.
    let hb_is_stale = match (hb, latest) {
        (Some(h), Some(r)) => h.time.system_time() < r.finished.system_time(),
        (None, Some(_)) => true,
        _ => false,
    };

    if running_version == Some(published.digest) && !hb_is_stale {
        // A self-update re-locked the flake's inputs on the host: it runs the published
        // version, built from newer inputs, on purpose.
        if hb.is_some_and(|h| h.auto_updated) {
            return Assessment::because(
                State::UpToDate,
                "auto-updated: flake inputs re-locked on the host",
            );
        }
        return check_system(running_system, facts.expected, attempt);
    }
    if let Some(r) = attempt {
        match r.outcome {
            Outcome::Failure => {
                return Assessment::because(State::Failing, one_line(r.error.as_deref()))
            }
            Outcome::Rollback => {
                return Assessment::because(State::RolledBack, one_line(r.error.as_deref()))
            }
            Outcome::Success if hb_is_stale => {
                return check_system(r.system_after.as_deref(), facts.expected, Some(r));
            }
            Outcome::Success => {
                // Applied the live version, and a later heartbeat says it runs another.
                return Assessment::because(
                    State::Drifted,
                    format!(
                        "applied {} but now runs version {}",
                        published.digest.short(),
                        running_version.map_or_else(|| "unknown".to_owned(), |d| d.short())
                    ),
                );
            }
        }
    }
    // No attempt at the live version yet. The host should still run what it last applied.
    if let (Some(r), Some(running)) = (latest, running_system) {
        let applied = match r.outcome {
            Outcome::Success => r.system_after.as_deref(),
            Outcome::Failure | Outcome::Rollback => r.system_before.as_deref(),
        };
        if Some(r.version) == running_version && applied.is_some_and(|a| a != running) {
            return drifted(running, applied);
        }
        // The agent writes no version when the running system is not the one it applied.
        let had_applied = r.outcome == Outcome::Success || r.previous_version.is_some();
        if running_version.is_none() && had_applied && !hb_is_stale {
            return drifted(running, applied);
        }
    }
    Assessment::new(State::UpdatePending)
}

/// The host runs the live version: up to date if its system is the one it should be.
fn check_system(
    running: Option<&str>,
    expected: Option<&StorePath>,
    attempt: Option<&Report>,
) -> Assessment {
    let should = expected
        .map(StorePath::as_str)
        .or_else(|| attempt.and_then(|r| r.system_after.as_deref()));
    match (running, should) {
        (Some(run), Some(should)) if run != should => drifted(run, Some(should)),
        _ => Assessment::new(State::UpToDate),
    }
}

fn drifted(running: &str, should: Option<&str>) -> Assessment {
    // Only store paths reach here (collect checks what hosts write); never quote raw text.
    let name =
        |p: &str| StorePath::new(p).map_or_else(|_| "?".to_owned(), |s| s.short_hash(8).to_owned());
    Assessment::because(
        State::Drifted,
        format!(
            "runs {} instead of {} (changed by hand?)",
            name(running),
            should.map_or_else(|| "?".to_owned(), name)
        ),
    )
}

/// The longest host-written error a row shows.
const MAX_ERROR_CHARS: usize = 200;

/// The first line of a host-written error, bounded (a host is not trusted to be brief) by
/// cutting its middle: the end of an error often says how to fix it.
pub fn one_line(error: Option<&str>) -> String {
    let first = error
        .unwrap_or("no error message")
        .lines()
        .next()
        .unwrap_or("");
    let clean: String = first.chars().filter(|c| !c.is_control()).collect();
    let mut s = crate::sys::terminal::truncate_middle(&clean, MAX_ERROR_CHARS).into_owned();
    if s.is_empty() {
        s.push_str("no error message");
    }
    s
}

#[cfg(test)]
mod tests;
