//! Health checks a host runs after activation, before the update counts as a success
//! (`checks = [ … ]` and `on_failure` in bento.toml's `[defaults]` and `[hosts.NAME]`, or
//! agent.toml), and what a report says about each.
//!
//! Invariant: a [`Check`] is valid once built — exactly one kind, a unit name systemd would
//! accept (never one that reads as an option), an `http://` URL with a host, a non-empty
//! command, a timeout above zero — so bento.toml is refused at parse time, naming the key,
//! and the agent never runs a check it cannot describe.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long one evaluation of a check may take unless it says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The name the built-in check has in reports.
pub const BUILTIN: &str = "failed-units";

/// One configured check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CheckToml", into = "CheckToml")]
pub struct Check {
    pub kind: CheckKind,
    /// How long one evaluation may take (the check is retried until `confirm_timeout`).
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// `systemctl is-active UNIT` says `active`.
    Unit(String),
    /// A GET answers with a 2xx status.
    Http(HttpUrl),
    /// The command exits 0.
    Command(Vec<String>),
}

impl Check {
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }
}

/// How reports name a check: `unit nginx.service`, `http http://…`, `command /bin/x arg`.
impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            CheckKind::Unit(u) => write!(f, "unit {u}"),
            CheckKind::Http(url) => write!(f, "http {url}"),
            CheckKind::Command(argv) => write!(f, "command {}", argv.join(" ")),
        }
    }
}

/// The form a person writes: `{ unit = "…" }`, `{ http = "…" }` or `{ command = [ … ] }`,
/// each with an optional `timeout` (humantime: `5s`). bento-host.json carries the same form.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckToml {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    command: Option<Vec<String>>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    timeout: Option<Duration>,
}

impl TryFrom<CheckToml> for Check {
    type Error = String;

    fn try_from(t: CheckToml) -> Result<Self, String> {
        let kind = match (t.unit, t.http, t.command) {
            (Some(u), None, None) => CheckKind::Unit(unit_name(&u)?),
            (None, Some(h), None) => CheckKind::Http(h.parse()?),
            (None, None, Some(c)) => {
                if c.first().is_none_or(|p| p.is_empty()) {
                    return Err("a command check needs a program: `command = [\"/path/to/program\", …]`".into());
                }
                CheckKind::Command(c)
            }
            (None, None, None) => {
                return Err(
                    "a check needs one of `unit`, `http` or `command` (e.g. `{ unit = \"nginx.service\" }`)".into(),
                )
            }
            _ => return Err("a check has exactly one of `unit`, `http` or `command`".into()),
        };
        if t.timeout.is_some_and(|d| d.is_zero()) {
            return Err("a check's timeout must be more than zero".into());
        }
        Ok(Check {
            kind,
            timeout: t.timeout,
        })
    }
}

impl From<Check> for CheckToml {
    fn from(c: Check) -> Self {
        let mut t = CheckToml {
            unit: None,
            http: None,
            command: None,
            timeout: c.timeout,
        };
        match c.kind {
            CheckKind::Unit(u) => t.unit = Some(u),
            CheckKind::Http(url) => t.http = Some(url.to_string()),
            CheckKind::Command(argv) => t.command = Some(argv),
        }
        t
    }
}

/// The unit types a check may name.
const UNIT_TYPES: [&str; 11] = [
    "service",
    "socket",
    "target",
    "mount",
    "automount",
    "timer",
    "path",
    "swap",
    "slice",
    "scope",
    "device",
];

/// A unit name as systemd spells them: `name.type`, at most 255 characters of
/// `[A-Za-z0-9:_.@\-]` (and `\` escapes), not starting with `-` (it would read as an option).
fn unit_name(u: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "unit {u:?} is not a unit name (like `nginx.service`: letters, digits, `:_.@-\\`, ending in .{})",
            UNIT_TYPES.join(", .")
        )
    };
    let allowed = |c: char| c.is_ascii_alphanumeric() || ":_.@-\\".contains(c);
    let (stem, ty) = u.rsplit_once('.').ok_or_else(bad)?;
    if u.len() > 255
        || stem.is_empty()
        || u.starts_with('-')
        || !u.chars().all(allowed)
        || !UNIT_TYPES.contains(&ty)
    {
        return Err(bad());
    }
    Ok(u.to_owned())
}

/// An `http://` URL (no TLS: a check talks to the machine itself or its neighbours).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// As written after `http://`, up to the path: `127.0.0.1:8080`, `[::1]:80`, `localhost`.
    pub authority: String,
    pub host: String,
    pub port: u16,
    /// Starts with `/`.
    pub path: String,
}

impl std::str::FromStr for HttpUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("http {s:?}: {why}");
        if s.starts_with("https://") {
            return Err(bad(
                "only http:// URLs are checked (no TLS); check a local plain-HTTP endpoint",
            ));
        }
        let rest = s
            .strip_prefix("http://")
            .ok_or_else(|| bad("not an http:// URL"))?;
        if s.chars().any(|c| c.is_ascii_control() || c.is_whitespace()) {
            return Err(bad("a URL has no spaces or control characters"));
        }
        let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
        let tail = tail.split('#').next().unwrap_or_default();
        let path = match tail {
            "" => "/".to_owned(),
            t if t.starts_with('/') => t.to_owned(),
            t => format!("/{t}"),
        };
        if authority.contains('@') {
            return Err(bad("user names and passwords are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?,
        };
        Ok(HttpUrl {
            authority: authority.to_owned(),
            host: host.to_owned(),
            port,
            path,
        })
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// What to do when a check fails after activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Go back to the exact system (and files) that ran before: outcome `rollback`.
    #[default]
    Rollback,
    /// Leave the new system running: outcome `failure`.
    Keep,
}

impl OnFailure {
    pub fn is_default(&self) -> bool {
        *self == OnFailure::Rollback
    }
}

/// How one check ended, in a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Passed,
    Failed,
    /// Not run, and why is in `detail` (the built-in check where systemd is not the
    /// service manager, or when nothing was activated).
    Skipped,
}

/// One check's result in a report: `{ "check": "unit nginx.service", "result": "failed",
/// "detail": "failed" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckResult {
    /// The check as [`Check`]'s `Display` names it, or `failed-units` for the built-in one.
    pub check: String,
    pub result: CheckStatus,
    /// What it saw: the unit's state, the HTTP status or error, the exit status and last
    /// line of output, the units that failed.
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Check>, String> {
        #[derive(Deserialize)]
        struct T {
            checks: Vec<Check>,
        }
        toml::from_str::<T>(text)
            .map(|t| t.checks)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_three_kinds_parse_and_round_trip() {
        let checks = parse(
            r#"checks = [ { unit = "nginx.service" }, { http = "http://127.0.0.1:8080/health", timeout = "3s" }, { command = ["/run/current-system/sw/bin/true"] } ]"#,
        )
        .unwrap();
        assert_eq!(checks[0].kind, CheckKind::Unit("nginx.service".into()));
        assert_eq!(checks[0].timeout(), DEFAULT_TIMEOUT);
        let CheckKind::Http(url) = &checks[1].kind else {
            panic!("{checks:?}")
        };
        assert_eq!((url.host.as_str(), url.port), ("127.0.0.1", 8080));
        assert_eq!(url.path, "/health");
        assert_eq!(checks[1].timeout(), Duration::from_secs(3));
        assert_eq!(
            checks[2].to_string(),
            "command /run/current-system/sw/bin/true"
        );
        let json = serde_json::to_string(&checks).unwrap();
        assert_eq!(
            json,
            r#"[{"unit":"nginx.service"},{"http":"http://127.0.0.1:8080/health","timeout":"3s"},{"command":["/run/current-system/sw/bin/true"]}]"#
        );
        let back: Vec<Check> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, checks);
    }

    #[test]
    fn bad_checks_are_refused_with_what_is_wrong() {
        for (text, want) in [
            (r#"checks = [ { tcp = "x" } ]"#, "unknown field `tcp`"),
            (r#"checks = [ { } ]"#, "needs one of"),
            (
                r#"checks = [ { unit = "a.service", command = ["/bin/true"] } ]"#,
                "exactly one",
            ),
            (r#"checks = [ { command = [] } ]"#, "needs a program"),
            (r#"checks = [ { command = [""] } ]"#, "needs a program"),
            (r#"checks = [ { http = "https://x/" } ]"#, "no TLS"),
            (
                r#"checks = [ { http = "ftp://x/" } ]"#,
                "not an http:// URL",
            ),
            (r#"checks = [ { http = "http:///x" } ]"#, "no host"),
            (r#"checks = [ { http = "http://x:99999/" } ]"#, "port"),
            (r#"checks = [ { http = "http://a b/" } ]"#, "spaces"),
            (r#"checks = [ { unit = "nginx" } ]"#, "not a unit name"),
            (
                r#"checks = [ { unit = "--all.service" } ]"#,
                "not a unit name",
            ),
            (
                r#"checks = [ { unit = "a b.service" } ]"#,
                "not a unit name",
            ),
            (
                r#"checks = [ { unit = "a.service", timeout = "0s" } ]"#,
                "more than zero",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn urls_default_their_port_and_path() {
        let u: HttpUrl = "http://localhost".parse().unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u: HttpUrl = "http://[::1]:81/a?b=c#frag".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 81, "/a?b=c")
        );
        assert_eq!(u.to_string(), "http://[::1]:81/a?b=c");
    }
}
