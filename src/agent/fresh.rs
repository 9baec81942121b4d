//! Is the source fresh? The signed stamp of the live version (`manifests/<digest>.fresh`,
//! `crate::protocol::freshness`) against this machine's clock: a source that offers a stamp
//! that ran out, a refused stamp, or no stamp where the applied version's settings demand
//! one (`freshness_secs`), is `stale`: the run changes nothing and says so.
//!
//! Invariants: [`check`] is one source's verdict (the source-choice logic asks each source
//! it reaches); it fetches the stamp only when the answer can change (a new live version, or
//! a remembered stamp with less than half its window left), so a no-change poll costs what
//! it did; the stamp's time decides staleness only, never which version is newer (serials).

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::fetch;
use super::source::{RemoteError, Source};
use crate::protocol::freshness::{FreshError, FreshStamp, SKEW_TOLERANCE};
use crate::protocol::manifest::Digest;
use crate::protocol::{signing, HostName, Timestamp};

/// A stamp this agent checked and accepted, kept in the state so that most polls need not
/// fetch it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub version: Digest,
    pub not_after: Timestamp,
}

/// What the agent knows before asking a source.
#[derive(Debug, Clone, Default)]
pub struct Known<'a> {
    /// The applied version.
    pub applied: Option<Digest>,
    /// The applied version's `freshness_secs`: the fleet demands a stamp.
    pub window: Option<Duration>,
    /// The last stamp accepted.
    pub seen: Option<&'a Seen>,
}

/// One source's word on the live version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A stamp that has not run out vouches for the live version.
    Fresh(Seen),
    /// Nothing to judge: the fleet demands no stamp for the version the host runs (or the
    /// live version is a new one, which the serial rule already judges), and none was found.
    Unchecked,
    /// The source cannot be trusted to be current; why, for the person reading.
    Stale(String),
}

/// Whether the stamp must be fetched to judge `live`: `None` when it need not, with the
/// verdict already known.
pub fn without_fetch(known: &Known<'_>, live: Digest, now: SystemTime) -> Option<Verdict> {
    let runs_live = known.applied == Some(live);
    match (runs_live, known.window) {
        // A fleet without freshness: the poll costs what it always did.
        (true, None) => Some(Verdict::Unchecked),
        (true, Some(window)) => {
            let seen = known.seen.filter(|s| s.version == live)?;
            let left = seen
                .not_after
                .system_time()
                .duration_since(now)
                .unwrap_or_default();
            (left > window / 2).then(|| Verdict::Fresh(seen.clone()))
        }
        // A new version: its stamp is fetched with it.
        (false, _) => None,
    }
}

/// The verdict on what the source answered for `live`'s stamp.
pub fn judge(
    known: &Known<'_>,
    live: Digest,
    found: Option<Result<FreshStamp, FreshError>>,
    now: SystemTime,
) -> Verdict {
    let short = live.short();
    match found {
        None if known.applied == Some(live) && known.window.is_some() => Verdict::Stale(format!(
            "the source has no freshness stamp for the live version {short}, and this fleet vouches for its versions for {} (freshness): it may be a copy that stopped following the server",
            humantime::format_duration(known.window.unwrap_or_default())
        )),
        None => Verdict::Unchecked,
        Some(Err(e)) => Verdict::Stale(format!(
            "the freshness stamp of the live version {short} is refused: {e}"
        )),
        Some(Ok(stamp)) if stamp.expired(now) => Verdict::Stale(format!(
            "the freshness stamp of the live version {short} ran out at {} (this machine's clock says {}; {}s of clock skew are tolerated): the source has not been refreshed since, so newer versions may be withheld",
            stamp.not_after,
            Timestamp::seconds(now),
            SKEW_TOLERANCE.as_secs()
        )),
        Some(Ok(stamp)) => Verdict::Fresh(Seen {
            version: live,
            not_after: stamp.not_after,
        }),
    }
}

/// One source's verdict on the live version `live` of `host`: fetches the stamp when
/// [`without_fetch`] cannot tell, and checks it with `trusted_keys` (none: the signature is
/// not checked, as manifests' are not).
pub fn check(
    src: &mut dyn Source,
    host: &HostName,
    live: Digest,
    trusted_keys: &[String],
    known: &Known<'_>,
    now: SystemTime,
) -> Result<Verdict, RemoteError> {
    if let Some(v) = without_fetch(known, live, now) {
        return Ok(v);
    }
    let found = match fetch::fresh(src, live) {
        Ok(None) => None,
        Ok(Some(bytes)) => Some(parse(&bytes, host, live, trusted_keys)),
        Err(RemoteError::TooLarge { limit, .. }) => Some(Err(FreshError::TooLarge(limit + 1))),
        Err(e) => return Err(e),
    };
    Ok(judge(known, live, found, now))
}

fn parse(
    bytes: &[u8],
    host: &HostName,
    live: Digest,
    trusted_keys: &[String],
) -> Result<FreshStamp, FreshError> {
    if trusted_keys.is_empty() {
        return FreshStamp::parse_untrusted(bytes, host, &live, None);
    }
    let trusted = signing::parse_trusted(trusted_keys)?;
    FreshStamp::parse_untrusted(bytes, host, &live, Some(&trusted))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn stamp(live: Digest, not_after: u64) -> FreshStamp {
        FreshStamp {
            format: 1,
            host: HostName::new("alpha").unwrap(),
            version: live,
            serial: 3,
            not_after: Timestamp::seconds(at(not_after)),
        }
    }

    #[test]
    fn a_fleet_without_freshness_costs_no_fetch_and_is_never_stale() {
        let v = Digest::of(b"v");
        let known = Known {
            applied: Some(v),
            ..Default::default()
        };
        assert_eq!(
            without_fetch(&known, v, at(1_000)),
            Some(Verdict::Unchecked)
        );
        // A new version is fetched with its stamp; none there is no verdict.
        let new = Digest::of(b"new");
        assert_eq!(without_fetch(&known, new, at(1_000)), None);
        assert_eq!(judge(&known, new, None, at(1_000)), Verdict::Unchecked);
    }

    #[test]
    fn a_remembered_stamp_spares_the_fetch_until_half_its_window_is_gone() {
        let v = Digest::of(b"v");
        let seen = Seen {
            version: v,
            not_after: Timestamp::seconds(at(10 * DAY.as_secs())),
        };
        let known = Known {
            applied: Some(v),
            window: Some(7 * DAY),
            seen: Some(&seen),
        };
        let early = at(10 * DAY.as_secs() - 4 * DAY.as_secs());
        assert_eq!(
            without_fetch(&known, v, early),
            Some(Verdict::Fresh(seen.clone()))
        );
        let late = at(10 * DAY.as_secs() - 3 * DAY.as_secs());
        assert_eq!(without_fetch(&known, v, late), None);
        // Remembered for another version: fetched.
        assert_eq!(without_fetch(&known, Digest::of(b"w"), early), None);
    }

    #[test]
    fn missing_refused_and_run_out_stamps_are_stale_where_they_matter() {
        let v = Digest::of(b"v");
        let known = Known {
            applied: Some(v),
            window: Some(DAY),
            seen: None,
        };
        let now = 1_000_000;
        let Verdict::Stale(why) = judge(&known, v, None, at(now)) else {
            panic!("a missing stamp the fleet demands is stale");
        };
        assert!(
            why.contains("no freshness stamp") && why.contains("1day"),
            "{why}"
        );
        let Verdict::Stale(why) = judge(&known, v, Some(Ok(stamp(v, now - 301))), at(now)) else {
            panic!("a stamp run out by more than the tolerance is stale");
        };
        assert!(why.contains("ran out at") && why.contains("300s"), "{why}");
        assert_eq!(
            judge(&known, v, Some(Ok(stamp(v, now - 299))), at(now)),
            Verdict::Fresh(Seen {
                version: v,
                not_after: Timestamp::seconds(at(now - 299))
            }),
            "within the clock-skew tolerance"
        );
        let refused = Some(Err(FreshError::Shape));
        let Verdict::Stale(why) = judge(&known, v, refused, at(now)) else {
            panic!("a refused stamp is stale");
        };
        assert!(why.contains("refused"), "{why}");
        // A new version's stamp that ran out: stale too, so it is not applied.
        let new = Digest::of(b"new");
        assert!(matches!(
            judge(&Known::default(), new, Some(Ok(stamp(new, 10))), at(now)),
            Verdict::Stale(_)
        ));
    }
}
