//! The engine's time as the client knows it: SigV4 signs the time of each request and
//! engines refuse one too far from theirs (often 15 minutes), so a machine with a wrong clock
//! signs with its own time corrected by the offset seen in the engine's `Date` headers.
//!
//! Invariant: the offset changes only when an answer's `Date` disagrees with the corrected
//! time by more than [`TOLERANCE_SECS`] (a `Date` has one-second resolution and arrives one
//! round trip late; small differences are harmless to a signature), and every change is kept
//! so the caller can report it.

use std::time::{Duration, SystemTime};

/// How far the engine's `Date` may be from the corrected local time before the offset is
/// corrected: well inside the skew engines allow, well beyond a round trip.
pub const TOLERANCE_SECS: i64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Clock {
    /// Engine time minus local time, in seconds.
    offset: i64,
    /// Whether an answer's `Date` changed the offset.
    corrected: bool,
}

impl Clock {
    /// A clock that starts `offset` seconds off the local one (tests force a skew this way).
    pub fn with_offset(offset: i64) -> Self {
        Clock {
            offset,
            corrected: false,
        }
    }

    /// The time to sign with.
    pub fn now(&self, local: SystemTime) -> SystemTime {
        shift(local, self.offset)
    }

    /// Takes in an answer's `Date` received at local time `local`; true when the offset
    /// changed (a request the engine refused for its time is then worth one retry).
    pub fn observe(&mut self, local: SystemTime, engine: SystemTime) -> bool {
        let seen = secs_between(local, engine);
        if (seen - self.offset).abs() <= TOLERANCE_SECS {
            return false;
        }
        self.offset = seen;
        self.corrected = true;
        true
    }

    /// Engine time minus local time, in seconds.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The offset, when an answer made the client correct its clock.
    pub fn correction(&self) -> Option<i64> {
        self.corrected.then_some(self.offset)
    }
}

fn shift(t: SystemTime, secs: i64) -> SystemTime {
    let d = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        t + d
    } else {
        t - d
    }
}

/// `to - from` in whole seconds.
fn secs_between(from: SystemTime, to: SystemTime) -> i64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64().round() as i64,
        Err(e) => -(e.duration().as_secs_f64().round() as i64),
    }
}

/// An HTTP `Date` header (RFC 7231), `None` when it is not one.
pub fn parse_http_date(text: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(text.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_clock_an_hour_ahead_is_corrected_from_the_engines_date() {
        let mut c = Clock::with_offset(0);
        // The local clock says 1 h later than the engine does.
        let local = t(1_800_000_000 + 3600);
        let engine = t(1_800_000_000);
        assert_eq!(c.now(local), local);
        assert!(c.observe(local, engine));
        assert_eq!(c.offset(), -3600);
        assert_eq!(c.now(local), engine);
        assert_eq!(c.correction(), Some(-3600));
        // The next answer agrees: nothing changes, and there is nothing to retry.
        assert!(!c.observe(
            local + Duration::from_secs(5),
            engine + Duration::from_secs(6)
        ));
        assert_eq!(c.offset(), -3600);
    }

    #[test]
    fn a_forced_offset_is_undone_by_the_first_answer() {
        let mut c = Clock::with_offset(3600);
        let now = t(1_800_000_000);
        assert_eq!(c.now(now), t(1_800_003_600));
        assert_eq!(c.correction(), None);
        assert!(c.observe(now, now));
        assert_eq!(c.offset(), 0);
        assert_eq!(c.now(now), now);
        assert_eq!(c.correction(), Some(0));
    }

    #[test]
    fn small_differences_are_left_alone() {
        let mut c = Clock::default();
        let now = t(1_800_000_000);
        for delta in [-TOLERANCE_SECS, -1, 0, 1, TOLERANCE_SECS] {
            let engine = shift(now, delta);
            assert!(!c.observe(now, engine), "{delta}");
        }
        assert_eq!(c.correction(), None);
        assert!(c.observe(now, shift(now, -TOLERANCE_SECS - 1)));
    }

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(t(784_111_777))
        );
        assert_eq!(parse_http_date("yesterday"), None);
    }
}
