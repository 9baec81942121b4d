//! The fleet repo: `bento.toml` (server settings and per-host settings) and host discovery
//! under `hosts/`. A loaded `Fleet` has a valid config; discovery adds the host list.

// Issue #12: `build_on` (server-side; `[defaults]` and `[hosts.NAME]`).
mod delivery;
mod discover;
// `[secrets]` (secrets encrypted at rest; server::secrets).
pub mod secrets;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::protocol::{
    account_name, check_group, check_prefix, HostName, NameError, MAX_ACCOUNT_LEN,
};
pub use delivery::{BuildOn, Defaults};
pub use discover::{
    discover, discover_each, materialize, select, undefined_message, BrokenDir, DiscoverError,
    Discovery, FlakeHosts, HostSource, NixFlakeHosts,
};

/// The fleet settings file at the root of the fleet repo.
pub const FLEET_FILE: &str = "bento.toml";
/// The directory holding one directory per host (or flake).
pub const HOSTS_DIR: &str = "hosts";
/// Where publish puts chroots unless `bento.toml` or `--chroot` says otherwise.
pub const DEFAULT_CHROOT: &str = "/srv/bento";
pub const DEFAULT_ACCOUNT_PREFIX: &str = "bento-";
pub const DEFAULT_AUTHORIZED_KEYS_DIR: &str = "/etc/bento/authorized_keys";
/// The group of the host accounts unless `[server] group` says otherwise.
pub const DEFAULT_GROUP: &str = "bento";

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("no {FLEET_FILE} in {0} or any parent directory (run `bento init` to create a fleet, or pass --fleet DIR)")]
    NotFound(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Name { path: PathBuf, source: NameError },
}

/// The tables of bento.toml (docs/reference.md documents each key of each).
pub const FLEET_TABLES: [&str; 5] = ["server", "defaults", "hosts", "rollout", "secrets"];
/// The keys of `[server]`.
pub const SERVER_KEYS: [&str; 17] = [
    "address",
    "port",
    "host_key",
    "chroot",
    "account_prefix",
    "group",
    "authorized_keys_dir",
    "signing_key",
    "backups",
    "trigger_command",
    "cache_key",
    "store",
    "s3_credentials",
    "reports",
    "state",
    "freshness",
    "format",
];
/// The keys of `[hosts.NAME]` besides the per-host settings (`SettingsLayer::KEYS`).
pub const HOST_KEYS: [&str; 5] = ["key", "tags", "address", "hold", "build_on"];
/// The keys of `[defaults]` besides the per-host settings.
pub const DEFAULTS_KEYS: [&str; 1] = ["build_on"];
/// The keys of `[rollout]`.
pub const ROLLOUT_KEYS: [&str; 1] = ["waves"];

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The address hosts connect to (a name or IP): `bento agent-config` puts it in each
    /// agent's `server` URL and known_hosts line.
    #[serde(default)]
    pub address: Option<String>,
    /// The port hosts connect to (`server` URL; known_hosts brackets when not 22).
    #[serde(default = "default_port")]
    pub port: u16,
    /// The public half of this server's SSH host key, for the agents' known_hosts.
    #[serde(default = "default_host_key")]
    pub host_key: PathBuf,
    /// The chroot root: every host gets `<chroot>/<host>/`.
    #[serde(default = "default_chroot")]
    pub chroot: PathBuf,
    #[serde(default = "default_prefix")]
    pub account_prefix: String,
    /// The group every host account is in and sshd's `Match Group` selects: one per fleet
    /// when several fleets share one sshd.
    #[serde(default = "default_group")]
    pub group: String,
    /// Root-owned directory of per-account authorized-keys files (`AuthorizedKeysFile <dir>/%u`),
    /// outside the chroots so a host can never edit its own key.
    #[serde(default = "default_authorized_keys_dir")]
    pub authorized_keys_dir: PathBuf,
    /// The fleet's signing key (`bento keygen`): publish signs every manifest with it. It
    /// must live outside the fleet repo.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// Give every host a private, writable `backups/` directory in its chroot
    /// (`bento server sync-accounts` creates it).
    #[serde(default)]
    pub backups: bool,
    // rollout (#13): `bento trigger`'s command, an argv with {host}/{address} (server/trigger.rs).
    #[serde(default)]
    pub trigger_command: Option<Vec<String>>,
    /// The Nix binary-cache signing key (`nix key generate-secret`) for hosts with
    /// `build_on = "server"`; outside the fleet repo.
    #[serde(default)]
    pub cache_key: Option<PathBuf>,
    /// Where the hosts' versions live: `s3://BUCKET/PREFIX/{host}?endpoint=URL&region=R`
    /// (`{host}` in the prefix or the bucket); none: the chroot.
    #[serde(default)]
    pub store: Option<String>,
    /// The publisher's S3 credentials (AWS shared-credentials format); none: the
    /// environment's `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`. Outside the fleet repo.
    #[serde(default)]
    pub s3_credentials: Option<PathBuf>,
    /// Where hosts write their reports when not `<host's prefix>/logs/` (`s3://…{host}…`).
    #[serde(default)]
    pub reports: Option<String>,
    /// The publisher's own state (caches, build records, the binary-cache pool, S3 keys)
    /// when the store is an object store; the chroot keeps its `.bento/`.
    #[serde(default)]
    pub state: Option<PathBuf>,
    /// How long a published version is vouched for: publish (and `publish --refresh`)
    /// writes a signed stamp beside each live version running out this long after, and a
    /// host whose source offers no stamp that has not run out is `stale`. Needs
    /// `signing_key`. Off by default.
    #[serde(default, deserialize_with = "positive_window")]
    pub freshness: Option<std::time::Duration>,
    /// The manifest format publish writes: 1 (each file listed in every host's manifest)
    /// or 2 (shared trees and packs: issue #26; agents from this release on read it).
    #[serde(default = "default_format", deserialize_with = "manifest_format")]
    pub format: u32,
}

fn default_format() -> u32 {
    crate::protocol::manifest::FORMAT
}

fn manifest_format<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if !crate::protocol::manifest::FORMATS.contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "format {n} is not one this bento writes: use 1 or 2"
        )));
    }
    Ok(n)
}

/// A freshness window: humantime syntax (`7d`), never zero.
fn positive_window<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<std::time::Duration>, D::Error> {
    let dur: Option<std::time::Duration> = humantime_serde::deserialize(d)?;
    if dur.is_some_and(|d| d.is_zero()) {
        return Err(serde::de::Error::custom("freshness must be more than zero"));
    }
    Ok(dur)
}

/// Where an object store's publisher keeps its state unless `[server] state` says.
pub const DEFAULT_STATE: &str = "/var/lib/bento";

fn default_port() -> u16 {
    22
}
/// Where OpenSSH keeps the host key agents pin (`[server] host_key`).
pub const DEFAULT_HOST_KEY: &str = "/etc/ssh/ssh_host_ed25519_key.pub";
fn default_host_key() -> PathBuf {
    PathBuf::from(DEFAULT_HOST_KEY)
}
fn default_chroot() -> PathBuf {
    PathBuf::from(DEFAULT_CHROOT)
}
fn default_prefix() -> String {
    DEFAULT_ACCOUNT_PREFIX.to_owned()
}
fn default_group() -> String {
    DEFAULT_GROUP.to_owned()
}
fn default_authorized_keys_dir() -> PathBuf {
    PathBuf::from(DEFAULT_AUTHORIZED_KEYS_DIR)
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            address: None,
            port: default_port(),
            host_key: default_host_key(),
            chroot: default_chroot(),
            account_prefix: default_prefix(),
            group: default_group(),
            authorized_keys_dir: default_authorized_keys_dir(),
            signing_key: None,
            backups: false,
            trigger_command: None,
            cache_key: None,
            store: None,
            s3_credentials: None,
            reports: None,
            state: None,
            freshness: None,
            format: default_format(),
        }
    }
}

/// `[hosts.NAME]`: the host's key, plus its layer of settings (`crate::protocol::settings`)
/// over `[defaults]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// The host's ssh public key (one OpenSSH public key line).
    pub key: Option<String>,
    pub settings: crate::protocol::settings::SettingsLayer,
    // rollout (#13): server-side only, never sent to the host (server/select.rs, trigger.rs).
    pub tags: Vec<crate::server::select::Tag>,
    pub address: Option<String>,
    pub hold: bool,
    /// Who builds the system: `"host"` (default) or `"server"` (issue #12); server-side only.
    pub build_on: Option<BuildOn>,
}

/// `[hosts.NAME]`'s own keys (`HOST_KEYS`), read beside the settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostOwn {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    tags: Vec<crate::server::select::Tag>,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    hold: bool,
    #[serde(default)]
    build_on: Option<BuildOn>,
}

impl<'de> Deserialize<'de> for HostConfig {
    /// Strict on both parts: the table is split into `key` and the settings keys, and each
    /// part refuses what it does not know.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use crate::protocol::settings::{from_table_beside, SettingsLayer};
        let mut table = toml::Table::deserialize(d)?;
        let settings = SettingsLayer::split_from(&mut table, &SettingsLayer::KEYS)
            .map_err(serde::de::Error::custom)?;
        let own: HostOwn =
            from_table_beside(table, &SettingsLayer::KEYS).map_err(serde::de::Error::custom)?;
        Ok(Self {
            key: own.key,
            settings,
            tags: own.tags,
            address: own.address,
            hold: own.hold,
            build_on: own.build_on,
        })
    }
}

/// A host's polling interval unless bento.toml says otherwise.
pub const DEFAULT_INTERVAL: std::time::Duration = crate::protocol::settings::DEFAULT_INTERVAL;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    #[serde(default)]
    pub server: ServerConfig,
    /// Settings for every host unless `[hosts.NAME]` says otherwise.
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default)]
    pub hosts: BTreeMap<HostName, HostConfig>,
    // rollout (#13): `[rollout] waves` (type in server/select.rs, planned by server/rollout.rs).
    #[serde(default)]
    pub rollout: crate::server::select::RolloutConfig,
    /// `[secrets]`: encryption of `files/` entries at rest (server::secrets).
    #[serde(default)]
    pub secrets: secrets::SecretsConfig,
}

impl FleetConfig {
    /// Parses `bento.toml` text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, FleetError> {
        let config: FleetConfig = toml::from_str(text).map_err(|e| FleetError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let name_err = |source| FleetError::Name {
            path: path.to_owned(),
            source,
        };
        check_prefix(&config.server.account_prefix).map_err(name_err)?;
        check_group(&config.server.group).map_err(name_err)?;
        for host in config.hosts.keys() {
            let account = account_name(&config.server.account_prefix, host).map_err(name_err)?;
            // Every account gets a group of its own name: the fleet's group cannot be one.
            if account == config.server.group {
                return Err(FleetError::Parse {
                    path: path.to_owned(),
                    message: format!(
                        "[server] group = {:?} is also the account (and own group) of host {host}: choose another group",
                        config.server.group
                    ),
                });
            }
        }
        if let Some(message) = config.test_mode_reboot() {
            return Err(FleetError::Parse {
                path: path.to_owned(),
                message,
            });
        }
        if !config.server.chroot.is_absolute() {
            return Err(FleetError::Parse {
                path: path.to_owned(),
                message: format!(
                    "[server] chroot = {:?} must be an absolute path",
                    config.server.chroot
                ),
            });
        }
        Ok(config)
    }

    /// `mode = "test"` with a `reboot` other than `"never"`, in `[defaults]` or as a host
    /// resolves them: a `test` activation is gone after a reboot, so the host would activate
    /// and reboot again at every run.
    fn test_mode_reboot(&self) -> Option<String> {
        use crate::protocol::settings::{HostSettings, RebootPolicy};
        use crate::protocol::Mode;
        let bad = |s: &HostSettings| s.mode == Mode::Test && s.reboot != RebootPolicy::Never;
        let why = "a `test` activation does not survive a reboot (set reboot = \"never\", or mode = \"switch\")";
        let reboot_word = |s: &HostSettings| match s.reboot {
            RebootPolicy::Never => "never",
            RebootPolicy::WhenNeeded => "when-needed",
            RebootPolicy::WhenNeededNow => "when-needed-now",
        };
        let defaults = HostSettings::resolve(
            &HostName::new("defaults").expect("a valid name"),
            &[&self.defaults.settings],
        );
        if bad(&defaults) {
            return Some(format!(
                "[defaults] mode = \"test\" with reboot = \"{}\": {why}",
                reboot_word(&defaults)
            ));
        }
        self.hosts.keys().find_map(|host| {
            let s = self.settings(host);
            bad(&s).then(|| {
                format!(
                    "[hosts.{host}] mode = \"test\" with reboot = \"{}\": {why}",
                    reboot_word(&s)
                )
            })
        })
    }

    /// The resolved settings of `host` (`[hosts.NAME]` over `[defaults]` over built-ins).
    pub fn settings(&self, host: &HostName) -> crate::protocol::settings::HostSettings {
        let own = self.hosts.get(host).map(|h| &h.settings);
        let layers: Vec<&crate::protocol::settings::SettingsLayer> =
            std::iter::once(&self.defaults.settings)
                .chain(own)
                .collect();
        let mut settings = crate::protocol::settings::HostSettings::resolve(host, &layers);
        settings.freshness_secs = self.server.freshness.map(|w| w.as_secs().max(1));
        settings
    }

    /// The host's polling interval.
    pub fn interval(&self, host: &HostName) -> std::time::Duration {
        self.settings(host).interval()
    }

    pub fn account(&self, host: &HostName) -> Result<String, NameError> {
        account_name(&self.server.account_prefix, host)
    }
}

/// A fleet repo on disk.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// The directory holding `bento.toml` (canonical).
    pub root: PathBuf,
    pub config: FleetConfig,
}

impl Fleet {
    /// Finds `bento.toml` in `start` or the nearest parent that has one, like git finds `.git`.
    pub fn find(start: &Path) -> Result<Self, FleetError> {
        let start_abs = std::fs::canonicalize(start).map_err(|source| FleetError::Read {
            path: start.to_owned(),
            source,
        })?;
        let mut dir = start_abs.as_path();
        loop {
            if dir.join(FLEET_FILE).is_file() {
                return Self::load(dir);
            }
            match dir.parent() {
                Some(p) => dir = p,
                None => return Err(FleetError::NotFound(start_abs)),
            }
        }
    }

    /// Loads the fleet whose `bento.toml` is directly in `root`.
    pub fn load(root: &Path) -> Result<Self, FleetError> {
        let root = std::fs::canonicalize(root).map_err(|source| FleetError::Read {
            path: root.to_owned(),
            source,
        })?;
        let path = root.join(FLEET_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| FleetError::Read {
            path: path.clone(),
            source,
        })?;
        let config = FleetConfig::parse(&text, &path)?;
        Ok(Self { root, config })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FleetConfig, FleetError> {
        FleetConfig::parse(text, Path::new("bento.toml"))
    }

    #[test]
    fn key_lists_are_the_structs_fields() {
        use crate::protocol::settings::{serde_fields, sorted};
        assert_eq!(sorted(&FLEET_TABLES), serde_fields::<FleetConfig>());
        assert_eq!(sorted(&SERVER_KEYS), serde_fields::<ServerConfig>());
        assert_eq!(sorted(&HOST_KEYS), serde_fields::<HostOwn>());
        assert_eq!(
            sorted(&ROLLOUT_KEYS),
            serde_fields::<crate::server::select::RolloutConfig>()
        );
        assert_eq!(
            sorted(&secrets::SECRETS_KEYS),
            serde_fields::<secrets::SecretsConfig>()
        );
        // [defaults] is read by hand: its own keys, then the settings layer, strictly.
        let toml = DEFAULTS_KEYS
            .iter()
            .map(|k| format!("[defaults]\n{k} = \"host\"\n"))
            .collect::<String>();
        parse(&toml).unwrap();
        let err = parse("[defaults]\nbento_no_such_key = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bento_no_such_key"), "{err}");
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.server.chroot, PathBuf::from("/srv/bento"));
        assert_eq!(c.server.account_prefix, "bento-");
        assert_eq!(c.server.port, 22);
        assert_eq!(c.server.group, "bento");
        assert!(c.hosts.is_empty());
    }

    #[test]
    fn the_group_is_a_group_name_and_no_hosts_account() {
        let c = parse("[server]\ngroup = \"fleet_b\"\n").unwrap();
        assert_eq!(c.server.group, "fleet_b");
        let err = parse("[server]\ngroup = \"Fleet B\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid group \"Fleet B\""), "{err}");
        let err = parse("[server]\ngroup = \"bento-web\"\n[hosts.web]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("host web") && err.contains("another group"),
            "{err}"
        );
    }

    #[test]
    fn hosts_and_server() {
        let c = parse(
            "[server]\naddress = \"bento.example.org\"\nchroot = \"/srv/x\"\n[hosts.alpha]\nkey = \"ssh-ed25519 AAAA\"\n[hosts.beta]\n",
        )
        .unwrap();
        assert_eq!(c.server.address.as_deref(), Some("bento.example.org"));
        assert_eq!(c.hosts.len(), 2);
        let alpha = HostName::new("alpha").unwrap();
        assert_eq!(c.account(&alpha).unwrap(), "bento-alpha");
    }

    #[test]
    fn host_interval() {
        let c = parse("[hosts.alpha]\ninterval = \"5m\"\n[hosts.beta]\n").unwrap();
        let host = |n: &str| HostName::new(n).unwrap();
        assert_eq!(
            c.interval(&host("alpha")),
            std::time::Duration::from_secs(300)
        );
        assert_eq!(c.interval(&host("beta")), DEFAULT_INTERVAL);
        let c = parse("[defaults]\ninterval = \"1h\"\nreboot = \"when-needed\"\n[hosts.alpha]\ninterval = \"5m\"\n[hosts.beta]\n").unwrap();
        assert_eq!(
            c.interval(&host("alpha")),
            std::time::Duration::from_secs(300)
        );
        assert_eq!(
            c.interval(&host("beta")),
            std::time::Duration::from_secs(3600)
        );
        assert_eq!(
            c.settings(&host("beta")).reboot,
            crate::protocol::settings::RebootPolicy::WhenNeeded
        );
        assert!(parse("[defaults]\nreboot = \"sometimes\"\n")
            .unwrap_err()
            .to_string()
            .contains("sometimes"));
        for bad in ["\"soon\"", "\"0s\"", "5"] {
            let err = parse(&format!("[hosts.alpha]\ninterval = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("interval") || err.contains("string"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn host_tables_are_strict_about_keys_and_values() {
        let c = parse("[hosts.alpha]\nkey = \"ssh-ed25519 AAAA\"\nmode = \"test\"\n").unwrap();
        let alpha = HostName::new("alpha").unwrap();
        assert_eq!(c.hosts[&alpha].key.as_deref(), Some("ssh-ed25519 AAAA"));
        assert_eq!(c.settings(&alpha).mode, crate::protocol::Mode::Test);
        for (bad, needle) in [
            ("colour = 1", "colour"),
            ("mode = \"reboot\"", "mode"),
            ("key = 5", "key"),
        ] {
            let err = parse(&format!("[hosts.alpha]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(needle) && err.contains("bento.toml"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_bad_health_check_is_refused_naming_the_file_host_and_check() {
        let c = parse("[defaults]\nchecks = [ { unit = \"nginx.service\" } ]\n[hosts.alpha]\non_failure = \"keep\"\n").unwrap();
        let alpha = HostName::new("alpha").unwrap();
        assert_eq!(c.settings(&alpha).checks.len(), 1);
        for (bad, needle) in [
            ("checks = [ { ping = \"x\" } ]", "unknown field `ping`"),
            ("checks = [ { command = [] } ]", "needs a program"),
            ("checks = [ { http = \"https://x/\" } ]", "no TLS"),
            ("checks = [ { unit = \"nginx\" } ]", "not a unit name"),
            (
                "checks = [ { unit = \"a.service\", timeout = \"0s\" } ]",
                "more than zero",
            ),
        ] {
            let err = parse(&format!("[hosts.alpha]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(needle) && err.contains("bento.toml") && err.contains("alpha"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn test_mode_with_a_reboot_is_refused_naming_the_host_and_both_keys() {
        for (text, place, policy) in [
            (
                "[hosts.kiosk]\nmode = \"test\"\nreboot = \"when-needed-now\"\n",
                "[hosts.kiosk]",
                "when-needed-now",
            ),
            // The two keys from two layers: the host's mode over the defaults' reboot.
            (
                "[defaults]\nreboot = \"when-needed\"\n[hosts.alpha]\n[hosts.kiosk]\nmode = \"test\"\n",
                "[hosts.kiosk]",
                "when-needed",
            ),
            (
                "[defaults]\nmode = \"test\"\nreboot = \"when-needed\"\n",
                "[defaults]",
                "when-needed",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains("bento.toml")
                    && err.contains(place)
                    && err.contains("mode = \"test\"")
                    && err.contains(&format!("reboot = \"{policy}\"")),
                "{text}: {err}"
            );
        }
        // `test` with `never`, and a reboot policy with another mode, are fine; so is a
        // host that overrides the defaults' `test`.
        parse("[hosts.kiosk]\nmode = \"test\"\nreboot = \"never\"\n").unwrap();
        parse("[defaults]\nreboot = \"when-needed-now\"\n[hosts.kiosk]\nmode = \"boot\"\n")
            .unwrap();
        parse("[defaults]\nmode = \"test\"\n[hosts.kiosk]\nreboot = \"when-needed\"\nmode = \"switch\"\n")
            .unwrap();
    }

    #[test]
    fn errors_name_line_and_column() {
        let err = parse("[server]\nport = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("bento.toml"), "{err}");
        let err = parse("[server]\nchroots = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("chroots"), "{err}");
        let err = parse("[hosts.Bad_Name]\n").unwrap_err().to_string();
        assert!(err.contains("Bad_Name"), "{err}");
        let err = parse("[hosts.averyveryverylonghostnamethat]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 31"), "{err}");
        let err = parse("[server]\nchroot = \"rel\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("absolute"), "{err}");
    }
}
