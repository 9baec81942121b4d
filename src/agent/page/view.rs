//! What the page shows: the state table (also `GET /state`), whether to offer Retry, and the
//! HTML, rendered by askama from `page.html` so every value is escaped by the template, not
//! by hand. The inline script and style are constants inserted verbatim, and the
//! Content-Security-Policy allows exactly those bytes by hash.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use askama::Template;
use serde::Serialize;

use super::runs::{lock, Runs, Shared};
use crate::agent::config::AgentConfig;
use crate::agent::state::{State, StateDir};
use crate::protocol::report::Outcome;

const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(super) struct Row {
    pub(super) key: &'static str,
    pub(super) label: &'static str,
    pub(super) value: String,
    /// `ok`, `bad`, `warn` or empty: how the page colours the value.
    pub(super) class: &'static str,
}

/// The newest version this machine tried is being held back (failed and backing off, or
/// rolled back): the page offers to try it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(super) struct RetryOffer {
    /// Short digest.
    pub(super) version: String,
    /// One sentence for the page.
    pub(super) message: String,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct PageState {
    pub(super) host: Option<String>,
    pub(super) rows: Vec<Row>,
    /// The update running now, if any.
    pub(super) running: Option<u64>,
    pub(super) reboot_pending: bool,
    pub(super) retry: Option<RetryOffer>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// `2026-11-25 12:15 UTC (3 minutes ago)`.
fn when(secs: u64, now: u64) -> String {
    let t = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string();
    let stamp = format!("{} {} UTC", &t[..10], &t[11..16]);
    let ago = now.saturating_sub(secs);
    let rel = match ago {
        0..=59 => "just now".to_owned(),
        60..=119 => "1 minute ago".to_owned(),
        120..=3599 => format!("{} minutes ago", ago / 60),
        3600..=7199 => "1 hour ago".to_owned(),
        7200..=86399 => format!("{} hours ago", ago / 3600),
        86400..=172799 => "1 day ago".to_owned(),
        _ => format!("{} days ago", ago / 86400),
    };
    format!("{stamp} ({rel})")
}

/// `/nix/store/<hash>-nixos-system-alpha-24.05` → `nixos-system-alpha-24.05`.
fn system_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name,
        _ => base,
    }
}

/// The rows of the state table, from the agent's settings and state file.
pub(super) fn state_rows(
    cfg: Result<&AgentConfig, String>,
    state: Result<&State, String>,
    now: u64,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let row = |key, label, value: String, class| Row {
        key,
        label,
        value,
        class,
    };
    match &cfg {
        Ok(cfg) => rows.push(row("host", "Machine", cfg.host.to_string(), "")),
        Err(e) => rows.push(row("host", "Machine", format!("unknown: {e}"), "bad")),
    }
    match state {
        Err(e) => rows.push(row(
            "applied",
            "Version applied",
            format!("unknown: {e}"),
            "bad",
        )),
        Ok(state) => {
            rows.push(match &state.applied {
                Some(a) => row(
                    "applied",
                    "Version applied",
                    format!(
                        "{} ({}), {}",
                        a.version.short(),
                        system_name(a.system.as_str()),
                        when(a.at, now)
                    ),
                    "",
                ),
                None => row("applied", "Version applied", "nothing yet".into(), ""),
            });
            rows.push(match &state.last {
                Some(l) => {
                    let (text, class) = match l.outcome {
                        Outcome::Success => ("succeeded", "ok"),
                        Outcome::Failure => ("failed", "bad"),
                        Outcome::Rollback => ("rolled back", "bad"),
                    };
                    let err = l
                        .error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default();
                    row(
                        "last",
                        "Last update",
                        format!(
                            "{text}, version {}, {}{err}",
                            l.version.short(),
                            when(l.finished, now)
                        ),
                        class,
                    )
                }
                None => row("last", "Last update", "none yet".into(), ""),
            });
            rows.push(if state.reboot_pending {
                row(
                    "reboot",
                    "Reboot pending",
                    "yes: the new kernel runs after the next restart".into(),
                    "warn",
                )
            } else {
                row("reboot", "Reboot pending", "no".into(), "")
            });
        }
    }
    if let Ok(cfg) = cfg {
        rows.push(row("server", "Server", cfg.server.to_string(), ""));
    }
    rows.push(row(
        "agent",
        "Agent",
        format!("bento {}", env!("CARGO_PKG_VERSION")),
        "",
    ));
    rows
}

/// Whether the version this machine last tried is held back from the timer's runs. The page
/// cannot ask the server without a run, so "newest" is the newest this machine has seen:
/// the last run's version, unless it is the one applied.
pub(super) fn retry_offer(state: &State, now: u64) -> Option<RetryOffer> {
    let last = state.last.as_ref()?;
    let version = last.version;
    if state.applied.as_ref().is_some_and(|a| a.version == version) {
        return None;
    }
    let short = version.short();
    if state.rolled_back.contains(&version) {
        return Some(RetryOffer {
            message: format!(
                "Version {short} was rolled back, so the agent will not try it again by itself. Retry tries it now."
            ),
            version: short,
        });
    }
    let at = state.retry_at(&version)?;
    // Past the back-off, the next run (the timer's or the Update button) tries it anyway.
    (now < at).then(|| RetryOffer {
        message: format!(
            "Version {short} failed; the agent tries it again in {}. Retry tries it now.",
            humantime::format_duration(Duration::from_secs((at - now).div_ceil(60) * 60))
        ),
        version: short,
    })
}

pub(super) fn page_state(shared: &Shared) -> PageState {
    let cfg = AgentConfig::load(&shared.config_path).map_err(|e| e.to_string());
    let state = match &cfg {
        Ok(c) => {
            let dir = StateDir::new(&c.state_dir);
            dir.load()
                .map_err(|e| format!("{}: {e}", dir.state_file().display()))
        }
        Err(_) => Err("the agent's settings cannot be read".into()),
    };
    let now = now_secs();
    let rows = state_rows(
        cfg.as_ref().map_err(Clone::clone),
        state.as_ref().map_err(Clone::clone),
        now,
    );
    PageState {
        host: cfg.as_ref().ok().map(|c| c.host.to_string()),
        rows,
        running: lock(&shared.runs).running(),
        reboot_pending: state.as_ref().is_ok_and(|s| s.reboot_pending),
        retry: state.as_ref().ok().and_then(|s| retry_offer(s, now)),
    }
}

#[derive(Template)]
#[template(path = "page.html")]
struct Html<'a> {
    host: &'a str,
    rows: &'a [Row],
    running: bool,
    /// The latest run's lines and result, for a browser without JavaScript.
    has_run: bool,
    lines: &'a [String],
    result: &'a str,
    result_class: &'a str,
    retry: Option<&'a RetryOffer>,
    version: &'a str,
    script: &'a str,
    style: &'a str,
}

/// The page with the state, and the latest run for a browser without JavaScript.
pub(super) fn render_page(state: &PageState, runs: &Runs) -> String {
    let latest = runs.latest.as_ref();
    let finished = latest.and_then(|r| r.finished.as_ref());
    Html {
        host: state.host.as_deref().unwrap_or("this machine"),
        rows: &state.rows,
        running: runs.running().is_some(),
        has_run: latest.is_some(),
        lines: latest.map_or(&[], |r| &r.lines),
        result: finished.map_or("", |f| &f.message),
        result_class: match finished {
            Some(f) if f.outcome.good() => "ok",
            Some(_) => "bad",
            None => "",
        },
        retry: state.retry.as_ref(),
        version: env!("CARGO_PKG_VERSION"),
        script: SCRIPT,
        style: STYLE,
    }
    .render()
    .expect("the page renders: its values are plain strings")
}

/// Only the page's own inline script and style run (by hash), it talks only to itself, and no
/// other site may frame it.
pub(super) fn content_security_policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        use sha2::Digest as _;
        let hash = |text: &str| base64(&sha2::Sha256::digest(text.as_bytes()));
        format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            hash(SCRIPT),
            hash(STYLE)
        )
    })
}

/// Standard base64 with padding (CSP hashes; server::provision::keys tests use it too).
pub(crate) fn base64(bytes: &[u8]) -> String {
    use base64ct::Encoding as _;
    base64ct::Base64::encode_string(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::manifest::Digest;

    /// The text between the first `<tag>` and `</tag>` of the rendered page.
    fn inline_block<'a>(page: &'a str, tag: &str) -> &'a str {
        let start = page.find(&format!("<{tag}>")).unwrap() + tag.len() + 2;
        let end = start + page[start..].find(&format!("</{tag}>")).unwrap();
        &page[start..end]
    }

    fn state_at(now: u64) -> State {
        let v = Digest::of(b"v1");
        // From JSON, as the agent writes it (fields added later take their defaults).
        serde_json::from_value(serde_json::json!({
            "applied": {
                "version": v,
                "system": "/nix/store/6x2qmbmbawhx4s6w4wyr8j9lmzz3q5fh-nixos-system-alpha-1",
                "at": now - 300,
            },
            "last": {
                "id": "x",
                "version": Digest::of(b"v2"),
                "outcome": "failure",
                "finished": now - 60,
                "error": "build <failed> & stopped",
            },
            "failures": { "version": Digest::of(b"v2"), "count": 1, "last": now - 60 },
            "reboot_pending": true,
        }))
        .unwrap()
    }

    #[test]
    fn the_page_shows_the_state_escaped() {
        let cfg = AgentConfig::parse(
            "host = \"alpha\"\nserver = \"sftp://bento-alpha@bento.example.org\"\n",
            std::path::Path::new("agent.toml"),
        )
        .unwrap();
        let now = 1_800_000_000;
        let state = state_at(now);
        let rows = state_rows(Ok(&cfg), Ok(&state), now);
        let value = |k: &str| rows.iter().find(|r| r.key == k).unwrap().value.clone();
        assert_eq!(value("host"), "alpha");
        let v1 = Digest::of(b"v1").short();
        assert!(value("applied").contains(&v1), "{rows:?}");
        assert!(
            value("applied").contains("(nixos-system-alpha-1)"),
            "{rows:?}"
        );
        assert!(value("applied").contains("5 minutes ago"), "{rows:?}");
        assert!(value("last").starts_with("failed, version"), "{rows:?}");
        assert!(value("last").contains("1 minute ago"), "{rows:?}");
        assert!(value("reboot").starts_with("yes"));
        let page = PageState {
            host: Some("<alpha>".into()),
            retry: retry_offer(&state, now),
            rows,
            running: None,
            reboot_pending: true,
        };
        let html = render_page(&page, &Runs::default());
        assert!(
            html.contains("build &#60;failed&#62; &#38; stopped"),
            "escaped (askama writes numeric references): {html}"
        );
        assert!(!html.contains("<failed>") && !html.contains("<alpha>"));
        assert!(html.contains("data-running=\"false\""));
        assert!(html.contains("id=\"retry\""), "Retry offered");
        assert!(!html.contains("id=\"backoff\" hidden"), "and visible");

        let rows = state_rows(Err("no such file".into()), Err("no state".into()), now);
        assert!(rows[0].value.contains("no such file") && rows[0].class == "bad");
    }

    #[test]
    fn the_policy_allows_exactly_the_inline_script_and_style() {
        let page = PageState {
            host: None,
            rows: Vec::new(),
            running: None,
            reboot_pending: false,
            retry: None,
        };
        let html = render_page(&page, &Runs::default());
        let csp = content_security_policy();
        use sha2::Digest as _;
        for (tag, directive) in [("script", "script-src"), ("style", "style-src")] {
            let block = inline_block(&html, tag);
            let hash = base64(&sha2::Sha256::digest(block.as_bytes()));
            assert!(
                csp.contains(&format!("{directive} 'sha256-{hash}'")),
                "{tag} as rendered is allowed: {csp}"
            );
        }
        assert!(inline_block(&html, "script").contains("EventSource"));
        assert!(html.contains("id=\"backoff\" hidden"), "no Retry offered");
        assert_eq!(base64(b"hello"), "aGVsbG8=");
    }

    #[test]
    fn retry_is_offered_while_the_newest_version_is_held_back() {
        let now = 1_800_000_000;
        let mut state = state_at(now);
        let offer = retry_offer(&state, now).expect("backing off");
        assert_eq!(offer.version, Digest::of(b"v2").short());
        assert!(offer.message.contains("tries it again in 4m"), "{offer:?}");
        // Past the back-off the next run retries anyway.
        assert_eq!(retry_offer(&state, now + 3600), None);
        // Rolled back: never retried by itself, so offered whatever the time.
        state.last.as_mut().unwrap().outcome = Outcome::Rollback;
        state.rolled_back.push(Digest::of(b"v2"));
        let offer = retry_offer(&state, now + 86_400).expect("rolled back");
        assert!(offer.message.contains("rolled back"), "{offer:?}");
        // The last run's version is the one applied: nothing is held back.
        state.last.as_mut().unwrap().version = Digest::of(b"v1");
        assert_eq!(retry_offer(&state, now), None);
        assert_eq!(retry_offer(&State::default(), now), None);
    }
}
