//! Per-host settings, declared once and layered once: built-in defaults, then bento.toml's
//! `[defaults]`, then `[hosts.NAME]` — resolved on the server into the host's
//! `bento-host.json`, which travels inside its snapshot at the root of the configuration tree
//! — and, on a host whose snapshot carries no such file, agent.toml's keys over the built-ins.
//! The settings are the polling interval, activation mode, reboot policy, self-update,
//! failure notification, and the health checks after activation with what a failing one
//! does (`checks`, `on_failure`: `crate::protocol::check`); the NixOS agent module can read the same file for the timer;
//! `bento status` uses the interval to judge silence.
//!
//! Invariant: every layer is parsed strictly (an unknown key or a bad value is an error that
//! names it), also where a layer shares its table with other keys (`[hosts.NAME]` has `key`,
//! agent.toml its connection): the table is split by key and each part is deserialised with
//! `deny_unknown_fields` (serde's `flatten` would silently accept unknown keys).

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::protocol::check::{Check, OnFailure};

/// The generated file's name in every host's configuration tree (reserved).
pub const FILE: &str = "bento-host.json";
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15 * 60);
/// How a new system is activated: the `switch-to-configuration` action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Activate now and make it the boot default.
    Switch,
    /// Make it the boot default; it runs after the next reboot.
    Boot,
    /// Activate now without making it the boot default.
    Test,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Switch => "switch",
            Mode::Boot => "boot",
            Mode::Test => "test",
        }
    }

    /// Whether the new system runs right after activation (so the server check makes sense).
    pub fn activates_now(&self) -> bool {
        !matches!(self, Mode::Boot)
    }
}

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

/// One layer of settings as a person writes it (`[defaults]`, `[hosts.NAME]`, agent.toml):
/// every key optional; a missing key falls through to the layer below.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsLayer {
    #[serde(default, deserialize_with = "positive_interval")]
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
    /// A host's own list replaces the one in `[defaults]` (lists are not merged).
    #[serde(default)]
    pub checks: Option<Vec<Check>>,
    #[serde(default)]
    pub on_failure: Option<OnFailure>,
}

impl SettingsLayer {
    /// The keys of a layer in bento.toml.
    pub const KEYS: [&'static str; 8] = [
        "interval",
        "mode",
        "reboot",
        "reboot_at",
        "self_update",
        "notify",
        "checks",
        "on_failure",
    ];
    /// The keys agent.toml may set: all but the interval, which is the timer's (bento.toml
    /// or the NixOS module decide it, not the agent).
    pub const AGENT_KEYS: [&'static str; 7] = [
        "mode",
        "reboot",
        "reboot_at",
        "self_update",
        "notify",
        "checks",
        "on_failure",
    ];

    /// Takes this layer's `keys` out of `table` and parses them strictly.
    pub fn split_from(table: &mut toml::Table, keys: &[&str]) -> Result<Self, String> {
        from_table(split_off(table, keys))
    }
}

/// The field names serde knows for `T`, a `deny_unknown_fields` struct, read from the
/// error an unknown key gets: what each list of keys (`KEYS` beside a struct) is checked
/// against, so a list cannot drift from the struct.
#[cfg(test)]
pub(crate) fn serde_fields<T: DeserializeOwned>() -> Vec<String> {
    let mut table = toml::Table::new();
    table.insert("bento_no_such_key".into(), toml::Value::Integer(0));
    let err = match T::deserialize(toml::Value::Table(table)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("an unknown key was accepted: not a deny_unknown_fields struct"),
    };
    // "unknown field `bento_no_such_key`, expected one of `a`, `b`" (or "expected `a`").
    let (_, list) = err
        .split_once(", expected")
        .unwrap_or_else(|| panic!("not an unknown-field error: {err}"));
    let mut fields: Vec<String> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    fields.sort();
    fields
}

/// Sorted, owned: to compare a `KEYS` list with [`serde_fields`].
#[cfg(test)]
pub(crate) fn sorted(keys: &[&str]) -> Vec<String> {
    let mut keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
    keys.sort();
    keys
}

/// Removes `keys` from `table` and returns them as a table of their own.
pub fn split_off(table: &mut toml::Table, keys: &[&str]) -> toml::Table {
    keys.iter()
        .filter_map(|k| table.remove(*k).map(|v| ((*k).to_owned(), v)))
        .collect()
}

/// Deserialises a table strictly; the message names the key at fault (`mode: unknown
/// variant …`, `colour: unknown field `colour`, expected one of …`).
pub fn from_table<T: DeserializeOwned>(table: toml::Table) -> Result<T, String> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // toml adds "in `key`" on a line of its own; the key leads the message already.
        let inner = inner.trim_end();
        let inner = match inner.rsplit_once('\n') {
            Some((msg, last)) if last.starts_with("in `") => msg,
            _ => inner,
        };
        if path == "." || path.is_empty() {
            inner.to_owned()
        } else {
            format!("{path}: {inner}")
        }
    })
}

/// [`from_table`] for the part of a table that shares it with a settings layer: an unknown
/// key's message also lists the settings keys, which were split off before.
pub fn from_table_beside<T: DeserializeOwned>(
    table: toml::Table,
    layer_keys: &[&str],
) -> Result<T, String> {
    from_table(table).map_err(|e| {
        if e.contains("unknown field") {
            let keys: Vec<String> = layer_keys.iter().map(|k| format!("`{k}`")).collect();
            format!("{e}, or a setting: {}", keys.join(", "))
        } else {
            e
        }
    })
}

/// A polling interval: humantime syntax (`15m`), never zero.
fn positive_interval<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let dur: Option<Duration> = humantime_serde::deserialize(d)?;
    if dur.is_some_and(|d| d.is_zero()) {
        return Err(serde::de::Error::custom("interval must be more than zero"));
    }
    Ok(dur)
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
    /// Health checks after activation (absent from the file when there are none, so a
    /// fleet without checks publishes the same bytes as before they existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
    /// What a failing check does (absent when it is the default, `rollback`).
    #[serde(default, skip_serializing_if = "OnFailure::is_default")]
    pub on_failure: OnFailure,
    /// `[server] freshness` in seconds: the host must find a signed stamp for its live
    /// version that has not run out, or it is `stale` (`crate::protocol::freshness`).
    /// Absent when the fleet sets none, so such a fleet publishes the bytes it did before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness_secs: Option<u64>,
}

pub const DEFAULT_REBOOT_AT: &str = "04:00";

impl HostSettings {
    /// The built-in defaults with `layers` over them, each over the one before it
    /// (`[&defaults, &own]`: the host's own keys win).
    pub fn resolve(host: &crate::protocol::HostName, layers: &[&SettingsLayer]) -> Self {
        // The topmost layer that sets a key decides it.
        fn pick<T>(
            layers: &[&SettingsLayer],
            key: impl Fn(&SettingsLayer) -> Option<T>,
        ) -> Option<T> {
            layers.iter().rev().find_map(|l| key(l))
        }
        Self {
            host: host.clone(),
            interval_secs: pick(layers, |l| l.interval)
                .unwrap_or(DEFAULT_INTERVAL)
                .as_secs(),
            mode: pick(layers, |l| l.mode).unwrap_or(Mode::Switch),
            reboot: pick(layers, |l| l.reboot).unwrap_or_default(),
            reboot_at: pick(layers, |l| l.reboot_at.clone())
                .unwrap_or_else(|| DEFAULT_REBOOT_AT.to_owned()),
            self_update: pick(layers, |l| l.self_update).unwrap_or(false),
            notify: pick(layers, |l| l.notify.clone()),
            checks: pick(layers, |l| l.checks.clone()).unwrap_or_default(),
            on_failure: pick(layers, |l| l.on_failure).unwrap_or_default(),
            // The fleet's, not a layer's: set by the server from `[server] freshness`.
            freshness_secs: None,
        }
    }

    /// The freshness window the host must hold a stamp for, when the fleet sets one.
    pub fn freshness(&self) -> Option<Duration> {
        self.freshness_secs.map(Duration::from_secs)
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
    fn key_lists_are_the_structs_fields() {
        assert_eq!(
            sorted(&SettingsLayer::KEYS),
            serde_fields::<SettingsLayer>()
        );
        assert!(SettingsLayer::AGENT_KEYS
            .iter()
            .all(|k| SettingsLayer::KEYS.contains(k)));
    }

    #[test]
    fn host_over_defaults_over_builtin() {
        let h = HostName::new("a").unwrap();
        let defaults = SettingsLayer {
            interval: Some(Duration::from_secs(600)),
            reboot: Some(RebootPolicy::WhenNeeded),
            ..Default::default()
        };
        let own = SettingsLayer {
            reboot: Some(RebootPolicy::WhenNeededNow),
            self_update: Some(true),
            ..Default::default()
        };
        let s = HostSettings::resolve(&h, &[&defaults, &own]);
        assert_eq!(s.interval(), Duration::from_secs(600));
        assert_eq!(s.reboot, RebootPolicy::WhenNeededNow);
        assert!(s.self_update);
        assert_eq!(s.mode, Mode::Switch);
        assert_eq!(s.reboot_at, "04:00");
        let back: HostSettings = serde_json::from_slice(&s.to_bytes()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn checks_layer_whole_and_stay_out_of_the_file_when_unset() {
        let h = HostName::new("a").unwrap();
        let parse = |t: &str| {
            let mut table: toml::Table = toml::from_str(t).unwrap();
            SettingsLayer::split_from(&mut table, &SettingsLayer::KEYS)
        };
        let plain = HostSettings::resolve(&h, &[]);
        let text = String::from_utf8(plain.to_bytes()).unwrap();
        // A fleet without checks publishes the bytes it published before they existed.
        assert!(
            !text.contains("checks") && !text.contains("on_failure"),
            "{text}"
        );
        let defaults =
            parse("checks = [ { unit = \"a.service\" }, { unit = \"b.service\" } ]").unwrap();
        let own =
            parse("checks = [ { command = [\"/bin/true\"] } ]\non_failure = \"keep\"").unwrap();
        let s = HostSettings::resolve(&h, &[&defaults, &own]);
        assert_eq!(s.checks.len(), 1, "the host's list replaces the defaults'");
        assert_eq!(s.on_failure, OnFailure::Keep);
        let back: HostSettings = serde_json::from_slice(&s.to_bytes()).unwrap();
        assert_eq!(back, s);
        let s = HostSettings::resolve(&h, &[&defaults]);
        assert_eq!(s.checks.len(), 2);
        assert_eq!(s.on_failure, OnFailure::Rollback);
        let e = parse("on_failure = \"ignore\"").unwrap_err();
        assert!(e.starts_with("on_failure: unknown variant"), "{e}");
        let e = parse("checks = [ { unit = \"a.service\" }, { unit = \"nope\" } ]").unwrap_err();
        assert!(
            e.starts_with("checks[1]: unit \"nope\" is not a unit name"),
            "{e}"
        );
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
