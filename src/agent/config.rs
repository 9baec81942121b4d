//! `/etc/bento/agent.toml`: every key, its default, and strict parsing (an unknown key or a
//! bad value is an error naming it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::agent::transport::ServerUrl;
use crate::protocol::HostName;

pub const DEFAULT_CONFIG: &str = "/etc/bento/agent.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// How a new system is activated: the `switch-to-configuration` action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
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

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This machine's name in the fleet.
    pub host: HostName,
    /// `sftp://account@host[:port]` or `file:///path`.
    #[serde(deserialize_with = "de_url")]
    pub server: ServerUrl,
    #[serde(default = "d_identity")]
    pub identity_file: PathBuf,
    #[serde(default = "d_known_hosts")]
    pub known_hosts: PathBuf,
    #[serde(default = "d_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "d_profile")]
    pub profile: PathBuf,
    #[serde(default = "d_mode")]
    pub mode: Mode,
    #[serde(default = "d_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// How long the server may stay unreachable after activation before rolling back.
    #[serde(default = "d_confirm_timeout", deserialize_with = "de_duration")]
    pub confirm_timeout: Duration,
    /// The running system; where it does not exist, the profile's target counts as running.
    #[serde(default = "d_current_system")]
    pub current_system: PathBuf,
    /// Prefix for the targets of `files` entries (`/mnt` when installing onto a mounted system).
    #[serde(default = "d_files_root")]
    pub files_root: PathBuf,
    /// Public keys whose signature a manifest must carry (`ssh-ed25519 …` lines; several
    /// for key rotation). Empty: signatures are not checked.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Reboot policy when the snapshot does not set one (bento.toml's `reboot` does).
    #[serde(default)]
    pub reboot: crate::protocol::settings::RebootPolicy,
    /// When `reboot = "when-needed"` may reboot (systemd calendar expression).
    #[serde(default = "d_reboot_at")]
    pub reboot_at: String,
    /// Re-lock flake inputs and rebuild, at most daily, when nothing new is published.
    #[serde(default)]
    pub self_update: bool,
    /// Command run after a failure or rollback, with the report on stdin.
    #[serde(default)]
    pub notify: Option<Vec<String>>,
    /// How to reboot (default: `systemctl kexec`, falling back to `systemctl reboot`).
    #[serde(default)]
    pub reboot_command: Option<Vec<String>>,
    /// The system the machine booted, to tell whether a new kernel needs a reboot.
    #[serde(default = "d_booted_system")]
    pub booted_system: PathBuf,
}

fn d_identity() -> PathBuf {
    "/etc/bento/id_ed25519".into()
}
fn d_known_hosts() -> PathBuf {
    "/etc/bento/known_hosts".into()
}
fn d_state_dir() -> PathBuf {
    "/var/lib/bento".into()
}
fn d_profile() -> PathBuf {
    "/nix/var/nix/profiles/system".into()
}
fn d_mode() -> Mode {
    Mode::Switch
}
fn d_connect_timeout() -> Duration {
    Duration::from_secs(20)
}
fn d_confirm_timeout() -> Duration {
    Duration::from_secs(60)
}
fn d_current_system() -> PathBuf {
    "/run/current-system".into()
}
fn d_reboot_at() -> String {
    crate::protocol::settings::DEFAULT_REBOOT_AT.to_owned()
}
fn d_booted_system() -> PathBuf {
    "/run/booted-system".into()
}
fn d_files_root() -> PathBuf {
    "/".into()
}

fn de_url<'de, D: Deserializer<'de>>(d: D) -> Result<ServerUrl, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration such as \"20s\" or \"2m\": {e}"
        ))
    })
}

impl AgentConfig {
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        for (key, p) in [
            ("identity_file", &config.identity_file),
            ("known_hosts", &config.known_hosts),
            ("state_dir", &config.state_dir),
            ("profile", &config.profile),
            ("current_system", &config.current_system),
            ("files_root", &config.files_root),
            ("booted_system", &config.booted_system),
        ] {
            if !p.is_absolute() {
                return Err(ConfigError::Parse {
                    path: path.to_owned(),
                    message: format!("{key} = {p:?} must be an absolute path"),
                });
            }
        }
        crate::protocol::signing::parse_trusted(&config.trusted_keys).map_err(|e| {
            ConfigError::Parse {
                path: path.to_owned(),
                message: format!("trusted_keys: {e}"),
            }
        })?;
        if config.connect_timeout.is_zero() {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: "connect_timeout must be more than zero".into(),
            });
        }
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(t, Path::new("agent.toml"))
    }

    #[test]
    fn defaults() {
        let c = parse("host = \"alpha\"\nserver = \"sftp://bento-alpha@bento.example.org:22\"\n")
            .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/bento"));
        assert_eq!(c.profile, PathBuf::from("/nix/var/nix/profiles/system"));
        assert_eq!(c.mode, Mode::Switch);
        assert_eq!(c.connect_timeout, Duration::from_secs(20));
        assert_eq!(c.confirm_timeout, Duration::from_secs(60));
        assert_eq!(c.current_system, PathBuf::from("/run/current-system"));
        assert_eq!(c.identity_file, PathBuf::from("/etc/bento/id_ed25519"));
        assert_eq!(c.known_hosts, PathBuf::from("/etc/bento/known_hosts"));
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse(
            r#"
host = "alpha"
server = "sftp://bento-alpha@bento.example.org:22"   # or "file:///mnt/bento/alpha"
identity_file = "/etc/bento/id_ed25519"
known_hosts = "/etc/bento/known_hosts"
state_dir = "/var/lib/bento"
profile = "/nix/var/nix/profiles/system"
mode = "switch"            # switch | boot | test
connect_timeout = "20s"
confirm_timeout = "60s"
current_system = "/run/current-system"
"#,
        )
        .unwrap();
        assert_eq!(c.host.as_str(), "alpha");
    }

    #[test]
    fn errors_name_the_key() {
        let base = "host = \"alpha\"\nserver = \"file:///srv/x\"\n";
        for (extra, needle) in [
            ("colour = 1\n", "colour"),
            ("mode = \"reboot\"\n", "reboot"),
            ("connect_timeout = \"soon\"\n", "soon"),
            ("state_dir = \"var\"\n", "state_dir"),
            ("trusted_keys = [\"ssh-ed25519 x\"]\n", "trusted key 1"),
        ] {
            let err = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(err.contains(needle), "{extra}: {err}");
            assert!(err.contains("agent.toml"), "{err}");
        }
        let err = parse("host = \"alpha\"\nserver = \"http://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sftp://"), "{err}");
        let err = parse("server = \"file:///x\"\n").unwrap_err().to_string();
        assert!(err.contains("host"), "{err}");
    }
}
