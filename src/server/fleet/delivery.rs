//! Where each host's system is built (issue #12, docs/delivery.md): `build_on = "host" |
//! "server"` in `[defaults]` and `[hosts.NAME]`. It is a server-side setting: it decides what
//! `bento publish` does (build and export a binary cache, or not) and does not travel in
//! `bento-host.json`; a host learns it from its manifest's `system` and its `cache/`.

use std::ops::Deref;

use serde::{Deserialize, Serialize};

use super::{FleetConfig, HostName};
use crate::protocol::settings::SettingsLayer;

/// Who builds a host's system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildOn {
    /// The host evaluates and builds its configuration itself (the default).
    #[default]
    Host,
    /// `bento publish` builds it and exports the closure as a signed binary cache into
    /// `<host>/cache/`; the host only substitutes.
    Server,
}

/// `[defaults]`: the per-host settings every host gets (`SettingsLayer`, which travels to the
/// host) plus the server-side `build_on`. Derefs to the settings, so readers of
/// `defaults.interval` are unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Defaults {
    pub settings: SettingsLayer,
    pub build_on: Option<BuildOn>,
}

impl Deref for Defaults {
    type Target = SettingsLayer;
    fn deref(&self) -> &SettingsLayer {
        &self.settings
    }
}

// `build_on` is taken out before the rest is read as `SettingsLayer`, which keeps refusing
// unknown keys (a `#[serde(flatten)]` would silently accept typos).
impl<'de> Deserialize<'de> for Defaults {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut table = toml::Table::deserialize(d)?;
        let build_on = table
            .remove("build_on")
            .map(BuildOn::deserialize)
            .transpose()
            .map_err(|e| D::Error::custom(format!("build_on: {}", e.message())))?;
        let settings = SettingsLayer::deserialize(toml::Value::Table(table))
            .map_err(|e| D::Error::custom(e.message()))?;
        Ok(Self { settings, build_on })
    }
}

impl FleetConfig {
    /// Where `host`'s system is built: `[hosts.NAME]` over `[defaults]` over `"host"`.
    pub fn build_on(&self, host: &HostName) -> BuildOn {
        self.hosts
            .get(host)
            .and_then(|h| h.build_on)
            .or(self.defaults.build_on)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn build_on_layers_and_typos_are_still_refused() {
        let parse = |t: &str| FleetConfig::parse(t, Path::new("bento.toml"));
        let c = parse("[defaults]\nbuild_on = \"server\"\ninterval = \"5m\"\n[hosts.a]\n[hosts.b]\nbuild_on = \"host\"\n[server]\ncache_key = \"/etc/bento/cache-key\"\n").unwrap();
        let h = |n: &str| HostName::new(n).unwrap();
        assert_eq!(c.build_on(&h("a")), BuildOn::Server);
        assert_eq!(c.build_on(&h("b")), BuildOn::Host);
        assert_eq!(
            c.defaults.interval,
            Some(std::time::Duration::from_secs(300))
        );
        assert_eq!(
            c.server.cache_key.as_deref(),
            Some(Path::new("/etc/bento/cache-key"))
        );
        assert_eq!(parse("").unwrap().build_on(&h("a")), BuildOn::Host);
        let err = parse("[defaults]\nbuild_on = \"cloud\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("build_on") && err.contains("cloud"), "{err}");
        let err = parse("[defaults]\nintervl = \"5m\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("intervl"), "{err}");
        let err = parse("[hosts.a]\nbuild_on = \"cloud\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cloud"), "{err}");
    }
}
