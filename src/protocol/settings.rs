//! Per-host settings that the sysadmin sets in `bento.toml` (`[defaults]`, overridden by
//! `[hosts.NAME]`) and that travel to the host inside its snapshot as `bento-host.json` at
//! the root of its configuration tree: the polling interval, rebuild mode, reboot policy,
//! self-update and failure notification. The agent applies them; the NixOS agent module can
//! read the same file for the timer; `bento status` uses the interval to judge silence.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::Mode;

/// The generated file's name in every host's configuration tree (reserved).
pub const FILE: &str = "bento-host.json";
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// When a host may reboot after an update changed its kernel, initrd or kernel modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RebootPolicy {
    /// Never reboot; `bento status` shows the reboot as pending.
    #[default]
    Never,
    /// Reboot at the next `reboot_at` calendar time (systemd calendar syntax).
    WhenNeeded,
    /// Reboot right after the report is delivered.
    WhenNeededNow,
}

/// Settings as written in bento.toml: every key optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsToml {
    #[serde(default, deserialize_with = "de_interval")]
    pub interval: Option<Duration>,
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub reboot: Option<RebootPolicy>,
    #[serde(default)]
    pub reboot_at: Option<String>,
    #[serde(default)]
    pub self_update: Option<bool>,
    #[serde(default)]
    pub notify: Option<Vec<String>>,
}

pub(crate) fn de_interval<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    let dur = humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!("interval {text:?}: {e} (write e.g. \"15m\")"))
    })?;
    if dur.is_zero() {
        return Err(serde::de::Error::custom("interval must be more than zero"));
    }
    Ok(Some(dur))
}

/// Resolved settings of one host: what `bento-host.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSettings {
    pub host: crate::protocol::HostName,
    /// Seconds between polls.
    pub interval_secs: u64,
    pub mode: Mode,
    pub reboot: RebootPolicy,
    /// systemd calendar expression for `reboot = "when-needed"` (default `04:00`).
    pub reboot_at: String,
    pub self_update: bool,
    /// A command run after a failure or rollback, with the report on stdin.
    pub notify: Option<Vec<String>>,
}

pub const DEFAULT_REBOOT_AT: &str = "04:00";

impl HostSettings {
    /// Host settings over fleet defaults over built-in defaults.
    pub fn resolve(
        host: &crate::protocol::HostName,
        defaults: &SettingsToml,
        own: &SettingsToml,
    ) -> Self {
        Self {
            host: host.clone(),
            interval_secs: own
                .interval
                .or(defaults.interval)
                .unwrap_or(DEFAULT_INTERVAL)
                .as_secs(),
            mode: own.mode.or(defaults.mode).unwrap_or(Mode::Switch),
            reboot: own.reboot.or(defaults.reboot).unwrap_or_default(),
            reboot_at: own
                .reboot_at
                .clone()
                .or_else(|| defaults.reboot_at.clone())
                .unwrap_or_else(|| DEFAULT_REBOOT_AT.to_owned()),
            self_update: own.self_update.or(defaults.self_update).unwrap_or(false),
            notify: own.notify.clone().or_else(|| defaults.notify.clone()),
        }
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("settings serialise");
        v.push(b'\n');
        v
    }
}

/// What to do about a reboot after a successful switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootAction {
    None,
    Now,
    At(String),
}

/// The reboot decision: only when the new system's boot files differ from the booted ones.
pub fn reboot_action(policy: RebootPolicy, reboot_at: &str, needed: bool) -> RebootAction {
    match (needed, policy) {
        (false, _) | (true, RebootPolicy::Never) => RebootAction::None,
        (true, RebootPolicy::WhenNeededNow) => RebootAction::Now,
        (true, RebootPolicy::WhenNeeded) => RebootAction::At(reboot_at.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::HostName;

    #[test]
    fn host_over_defaults_over_builtin() {
        let h = HostName::new("a").unwrap();
        let defaults = SettingsToml {
            interval: Some(Duration::from_secs(600)),
            reboot: Some(RebootPolicy::WhenNeeded),
            ..Default::default()
        };
        let own = SettingsToml {
            reboot: Some(RebootPolicy::WhenNeededNow),
            self_update: Some(true),
            ..Default::default()
        };
        let s = HostSettings::resolve(&h, &defaults, &own);
        assert_eq!(s.interval(), Duration::from_secs(600));
        assert_eq!(s.reboot, RebootPolicy::WhenNeededNow);
        assert!(s.self_update);
        assert_eq!(s.mode, Mode::Switch);
        assert_eq!(s.reboot_at, "04:00");
        let back: HostSettings = serde_json::from_slice(&s.to_bytes()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn reboot_decisions() {
        assert_eq!(
            reboot_action(RebootPolicy::WhenNeededNow, "x", false),
            RebootAction::None
        );
        assert_eq!(
            reboot_action(RebootPolicy::Never, "x", true),
            RebootAction::None
        );
        assert_eq!(
            reboot_action(RebootPolicy::WhenNeededNow, "x", true),
            RebootAction::Now
        );
        assert_eq!(
            reboot_action(RebootPolicy::WhenNeeded, "Sun 04:00", true),
            RebootAction::At("Sun 04:00".into())
        );
    }
}
