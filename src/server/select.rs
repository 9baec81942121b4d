//! Host selection: `--on SELECTOR` and rollout waves. A selector is a host name, a glob
//! (`web-*`), a tag (`@canary`, from `tags = [...]` under `[hosts.NAME]`) or a percentage
//! (`25%`). Selectors resolve against a list of known hosts; one that matches nothing is an
//! error naming it. A percentage ranks hosts by a stable hash of their name, so `25%` names
//! the same hosts on every run and on every server, and the hosts of `25%` are among `50%`'s.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::protocol::HostName;

/// A host tag: `[a-z0-9][a-z0-9_-]*`, at most 63 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(String);

impl Tag {
    pub fn new(s: &str) -> Result<Self, SelectError> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(SelectError::BadTag(s.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Tag {
    type Error = SelectError;
    fn try_from(s: String) -> Result<Self, SelectError> {
        Tag::new(&s)
    }
}

impl From<Tag> for String {
    fn from(t: Tag) -> String {
        t.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("tag {0:?}: a tag is lowercase letters, digits, '-' and '_' (at most 63 characters)")]
    BadTag(String),
    #[error("selector {text:?}: {problem}")]
    Bad { text: String, problem: String },
    #[error("selector {0} matches no host")]
    NoMatch(String),
}

/// One selector, as written (`alpha`, `web-*`, `@canary`, `25%`).
#[derive(Debug, Clone)]
pub enum Selector {
    Name(HostName),
    Glob(glob::Pattern),
    Tag(Tag),
    /// 1 to 100.
    Percent(u8),
}

impl PartialEq for Selector {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}
impl Eq for Selector {}

impl FromStr for Selector {
    type Err = SelectError;
    fn from_str(s: &str) -> Result<Self, SelectError> {
        let bad = |problem: String| SelectError::Bad {
            text: s.chars().take(80).collect(),
            problem,
        };
        if let Some(tag) = s.strip_prefix('@') {
            return Tag::new(tag)
                .map(Selector::Tag)
                .map_err(|e| bad(e.to_string()));
        }
        if let Some(n) = s.strip_suffix('%') {
            return match n.parse::<u8>() {
                Ok(p @ 1..=100) => Ok(Selector::Percent(p)),
                _ => Err(bad("a percentage is 1% to 100%".into())),
            };
        }
        if s.contains(['*', '?', '[']) {
            return glob::Pattern::new(s)
                .map(Selector::Glob)
                .map_err(|e| bad(format!("not a glob: {e}")));
        }
        HostName::new(s)
            .map(Selector::Name)
            .map_err(|e| bad(format!("not a host name, glob, @tag or percentage: {e}")))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Name(n) => write!(f, "{n}"),
            Selector::Glob(g) => f.write_str(g.as_str()),
            Selector::Tag(t) => write!(f, "@{t}"),
            Selector::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Every host's tags, from bento.toml (`server::targets::tags`).
pub type Tags = BTreeMap<HostName, Vec<Tag>>;

/// `[rollout]` in bento.toml (planned by `server::rollout`). It lives here, with the
/// selectors it holds, so that `server::fleet` needs nothing that needs `server::fleet`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// The waves, in order: `["@canary", "25%", "100%"]`.
    #[serde(default)]
    pub waves: Option<Vec<Selector>>,
}

/// A host's place in percentage order: the sha256 of its name (stable everywhere).
fn rank(host: &HostName) -> [u8; 32] {
    Sha256::digest(format!("bento-rollout\0{host}").as_bytes()).into()
}

/// The first `percent`% of `universe` in rank order, rounded up (so `1%` of a small fleet is
/// one host, never none).
pub fn percent(universe: &[HostName], percent: u8) -> BTreeSet<HostName> {
    let mut ranked: Vec<(&HostName, [u8; 32])> = universe.iter().map(|h| (h, rank(h))).collect();
    ranked.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0)));
    let n = (universe.len() * usize::from(percent)).div_ceil(100);
    ranked.into_iter().take(n).map(|(h, _)| h.clone()).collect()
}

/// The hosts of `universe` one selector matches, in universe order.
pub fn matching(selector: &Selector, universe: &[HostName], tags: &Tags) -> Vec<HostName> {
    let pct = match selector {
        Selector::Percent(p) => Some(percent(universe, *p)),
        _ => None,
    };
    universe
        .iter()
        .filter(|h| match selector {
            Selector::Name(n) => n == *h,
            Selector::Glob(g) => g.matches(h.as_str()),
            Selector::Tag(t) => tags.get(*h).is_some_and(|ts| ts.contains(t)),
            Selector::Percent(_) => pct.as_ref().is_some_and(|set| set.contains(*h)),
        })
        .cloned()
        .collect()
}

/// The union of what `selectors` match, in universe order. Every selector must match at
/// least one host.
pub fn resolve(
    selectors: &[Selector],
    universe: &[HostName],
    tags: &Tags,
) -> Result<Vec<HostName>, SelectError> {
    let mut chosen = BTreeSet::new();
    for s in selectors {
        let hosts = matching(s, universe, tags);
        if hosts.is_empty() {
            return Err(SelectError::NoMatch(s.to_string()));
        }
        chosen.extend(hosts);
    }
    Ok(universe
        .iter()
        .filter(|h| chosen.contains(*h))
        .cloned()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: &str) -> HostName {
        HostName::new(n).unwrap()
    }
    fn hosts(names: &[&str]) -> Vec<HostName> {
        names.iter().map(|n| h(n)).collect()
    }
    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }

    #[test]
    fn parses_every_kind_and_refuses_nonsense() {
        assert!(matches!(sel("alpha"), Selector::Name(_)));
        assert!(matches!(sel("web-*"), Selector::Glob(_)));
        assert!(matches!(sel("db-[0-9]"), Selector::Glob(_)));
        assert!(matches!(sel("@canary"), Selector::Tag(_)));
        assert!(matches!(sel("25%"), Selector::Percent(25)));
        for s in ["25%", "@lab", "web-?", "alpha"] {
            assert_eq!(sel(s).to_string(), s);
        }
        for bad in ["0%", "101%", "x%", "@", "@Bad", "Alpha", "web-[", ""] {
            let err = bad.parse::<Selector>().unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        let json = serde_json::to_string(&vec![sel("@canary"), sel("50%")]).unwrap();
        assert_eq!(json, r#"["@canary","50%"]"#);
        let back: Vec<Selector> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, vec![sel("@canary"), sel("50%")]);
    }

    #[test]
    fn names_globs_and_tags() {
        let all = hosts(&["db-1", "db-2", "web-1", "web-2", "web-10"]);
        let mut tags = Tags::new();
        tags.insert(h("web-1"), vec![Tag::new("canary").unwrap()]);
        tags.insert(h("db-2"), vec![Tag::new("canary").unwrap()]);
        let r = |s: &[&str]| {
            let sels: Vec<Selector> = s.iter().map(|x| sel(x)).collect();
            resolve(&sels, &all, &tags)
        };
        assert_eq!(r(&["web-*"]).unwrap(), hosts(&["web-1", "web-2", "web-10"]));
        assert_eq!(r(&["web-?"]).unwrap(), hosts(&["web-1", "web-2"]));
        assert_eq!(r(&["@canary"]).unwrap(), hosts(&["db-2", "web-1"]));
        // A union, in universe order, each host once.
        assert_eq!(
            r(&["web-2", "@canary", "db-*"]).unwrap(),
            hosts(&["db-1", "db-2", "web-1", "web-2"])
        );
        // Every selector must match something, and the error names it.
        assert_eq!(
            r(&["web-*", "@lab"]).unwrap_err(),
            SelectError::NoMatch("@lab".into())
        );
        assert_eq!(
            r(&["mail-*"]).unwrap_err().to_string(),
            "selector mail-* matches no host"
        );
        assert_eq!(
            r(&["gone"]).unwrap_err(),
            SelectError::NoMatch("gone".into())
        );
    }

    #[test]
    fn percentages_are_stable_nested_and_round_up() {
        let all: Vec<HostName> = (0..40).map(|i| h(&format!("host-{i}"))).collect();
        let quarter = percent(&all, 25);
        assert_eq!(quarter.len(), 10);
        // The same set whatever the order of the universe.
        let mut reversed = all.clone();
        reversed.reverse();
        assert_eq!(percent(&reversed, 25), quarter);
        // Nested: 25% ⊂ 50% ⊂ 100%.
        let half = percent(&all, 50);
        assert!(quarter.is_subset(&half));
        assert_eq!(percent(&all, 100).len(), 40);
        // Adding hosts keeps the old members in order (a host's rank is its own).
        let mut more = all.clone();
        more.extend((40..80).map(|i| h(&format!("host-{i}"))));
        let ranked_old: Vec<_> = percent(&more, 100)
            .into_iter()
            .filter(|x| all.contains(x))
            .collect();
        assert_eq!(ranked_old.len(), 40);
        // Rounded up: 1% of 3 hosts is one host.
        assert_eq!(percent(&all[..3], 1).len(), 1);
        // A fixed answer, so a change of the hash is noticed.
        let two = percent(&hosts(&["alpha", "beta", "gamma", "delta"]), 50);
        assert_eq!(two.len(), 2);
        assert_eq!(
            two,
            percent(&hosts(&["delta", "gamma", "beta", "alpha"]), 50)
        );
    }
}
