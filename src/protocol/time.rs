//! Protocol times (a manifest's `created`, a report's `started`/`finished`, a heartbeat's
//! `time` and `last_success`): RFC 3339 UTC text on the wire, a `SystemTime` in the code.
//!
//! Invariant: a `Timestamp` is parsed once, orders as a time, and serialises to exactly the
//! text it was read from. The manifest's digest is the hash of its bytes, and reports are
//! compared byte for byte by their readers, so a round trip must never re-format a time
//! (`…:00Z` stays `…:00Z`, `…:00.120Z` stays `…:00.120Z`).

use std::cmp::Ordering;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, thiserror::Error)]
#[error("{text:?} is not an RFC 3339 time (2026-11-25T12:00:00Z): {message}")]
pub struct BadTimestamp {
    pub text: String,
    pub message: String,
}

/// A point in time with the exact text it is written as.
#[derive(Debug, Clone)]
pub struct Timestamp {
    at: SystemTime,
    text: String,
}

impl Timestamp {
    /// Whole seconds, as the agent writes report and heartbeat times (`2026-11-25T12:00:00Z`).
    pub fn seconds(at: SystemTime) -> Self {
        let text = humantime::format_rfc3339_seconds(at).to_string();
        Self::parse(&text).expect("humantime writes what it reads")
    }

    /// Milliseconds, as the server writes a manifest's `created` (`2026-11-25T12:00:00.120Z`).
    pub fn millis(at: SystemTime) -> Self {
        let text = humantime::format_rfc3339_millis(at).to_string();
        Self::parse(&text).expect("humantime writes what it reads")
    }

    /// Whole seconds since the Unix epoch (the agent's state file keeps those).
    pub fn from_unix(secs: u64) -> Self {
        Self::seconds(UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// Accepts RFC 3339 with or without fractional seconds (what every bento wrote).
    pub fn parse(text: &str) -> Result<Self, BadTimestamp> {
        let at = humantime::parse_rfc3339_weak(text).map_err(|e| BadTimestamp {
            text: text.chars().take(100).collect(),
            message: e.to_string(),
        })?;
        Ok(Self {
            at,
            text: text.to_owned(),
        })
    }

    pub fn system_time(&self) -> SystemTime {
        self.at
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whole seconds since the Unix epoch (0 before it).
    pub fn unix(&self) -> u64 {
        self.at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    }
}

// Ordered by time; equal times written differently are told apart by their text, so that
// `Eq` and `Ord` agree.
impl Ord for Timestamp {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at
            .cmp(&other.at)
            .then_with(|| self.text.cmp(&other.text))
    }
}
impl PartialOrd for Timestamp {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Timestamp {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Timestamp {}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Timestamp {
    type Err = BadTimestamp;
    fn from_str(s: &str) -> Result<Self, BadTimestamp> {
        Self::parse(s)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_text_it_was_read_from() {
        for text in ["2026-11-25T12:00:00Z", "2026-11-25T12:00:00.120Z"] {
            let t: Timestamp = serde_json::from_str(&format!("\"{text}\"")).unwrap();
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{text}\""));
        }
        let at = UNIX_EPOCH + Duration::from_millis(1_795_000_000_120);
        assert_eq!(Timestamp::millis(at).as_str(), "2026-11-18T11:06:40.120Z");
        assert_eq!(Timestamp::seconds(at).as_str(), "2026-11-18T11:06:40Z");
        assert_eq!(Timestamp::from_unix(1_795_000_000).unix(), 1_795_000_000);
    }

    #[test]
    fn orders_as_times_not_as_text() {
        // As text ".900Z" sorts before "Z"; as times, 12:00:00 comes first.
        let whole = Timestamp::parse("2026-11-25T12:00:00Z").unwrap();
        let later = Timestamp::parse("2026-11-25T12:00:00.900Z").unwrap();
        assert!(later.as_str() < whole.as_str());
        assert!(whole < later);
        assert!(Timestamp::parse("yesterday").is_err());
    }
}
