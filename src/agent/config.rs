//! `/etc/bento/agent.toml`: every key, its default, and strict parsing (an unknown key or a
//! bad value is an error naming the file and the key). The keys are of two kinds: this
//! machine's own (server, paths, timeouts, trusted keys) and a layer of the per-host
//! settings (`protocol::settings`), which a snapshot's `bento-host.json` overrides.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::agent::source::{Connection, Purpose, RemoteError, S3Options, ServerUrl, SshOptions};

/// A new connection, or why there is none.
pub type ConnectResult = Result<Box<dyn Connection>, RemoteError>;
use crate::agent::state::StateDir;
use crate::protocol::settings::{self, HostSettings, SettingsLayer};
use crate::protocol::HostName;

pub use crate::protocol::Mode;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// This machine's name in the fleet.
    pub host: HostName,
    /// `sftp://account@host[:port]`, `s3://BUCKET/PREFIX?endpoint=…`, `https://HOST/PATH`
    /// or `file:///path`.
    pub server: ServerUrl,
    /// Other places holding a copy of the host's tree, tried in order when `server` cannot
    /// be reached, stalls or serves an older version than the applied one (`agent::choose`).
    pub mirrors: Vec<ServerUrl>,
    /// For `s3://` sources: `credentials_file`, `reports` (an `s3://` one), `ca_file`.
    pub s3: S3Options,
    /// For a read-only (`https://`) server: where reports and heartbeats go instead
    /// (`reports`: `sftp://`, `s3://` or `file://`); `None`: they stay in the spool.
    pub reports_to: Option<ServerUrl>,
    pub identity_file: PathBuf,
    pub known_hosts: PathBuf,
    pub state_dir: PathBuf,
    pub profile: PathBuf,
    pub connect_timeout: Duration,
    /// How long the server may stay unreachable after activation before rolling back.
    pub confirm_timeout: Duration,
    /// The longest one request to the server may go unanswered (a stalled server).
    pub stall_timeout: Duration,
    /// The longest a run may download and build (the confirmation has its own bound).
    pub run_timeout: Duration,
    /// The running system; where it does not exist, the profile's target counts as running.
    pub current_system: PathBuf,
    /// Prefix for the targets of `files` entries (`/mnt` when installing onto a mounted system).
    pub files_root: PathBuf,
    /// Public keys whose signature a manifest must carry (`ssh-ed25519 …` lines; several
    /// for key rotation). Empty: signatures are not checked.
    pub trusted_keys: Vec<String>,
    /// Nix public keys (`name:base64`, what `nix key convert-secret-to-public` prints) whose
    /// signature a prebuilt system's narinfos must carry (`build_on = "server"`). Empty: a
    /// prebuilt version is refused.
    pub cache_keys: Vec<String>,
    /// The lowest manifest `serial` this machine accepts, whatever its state directory
    /// says: set when its image is built (the fleet's serial then), so a wiped state cannot
    /// make it take an older signed version again. 0: no floor.
    pub min_serial: u64,
    /// How to reboot (default: `systemctl kexec`, falling back to `systemctl reboot`).
    pub reboot_command: Option<Vec<String>>,
    /// The system the machine booted, to tell whether a new kernel needs a reboot.
    pub booted_system: PathBuf,
    /// `mode`, `reboot`, `reboot_at`, `self_update`, `notify`: used when a snapshot carries
    /// no `bento-host.json`.
    pub settings: SettingsLayer,
}

/// The machine's own keys of agent.toml (beside `SettingsLayer::AGENT_KEYS`).
pub const MACHINE_KEYS: [&str; 21] = [
    "host",
    "server",
    "mirrors",
    "credentials_file",
    "reports",
    "ca_file",
    "identity_file",
    "known_hosts",
    "state_dir",
    "profile",
    "connect_timeout",
    "confirm_timeout",
    "stall_timeout",
    "run_timeout",
    "current_system",
    "files_root",
    "trusted_keys",
    "cache_keys",
    "min_serial",
    "reboot_command",
    "booted_system",
];

/// The machine's own keys, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineToml {
    host: HostName,
    #[serde(deserialize_with = "de_url")]
    server: ServerUrl,
    #[serde(default, deserialize_with = "de_urls")]
    mirrors: Vec<ServerUrl>,
    #[serde(default)]
    credentials_file: Option<PathBuf>,
    #[serde(default)]
    reports: Option<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default = "d_identity")]
    identity_file: PathBuf,
    #[serde(default = "d_known_hosts")]
    known_hosts: PathBuf,
    #[serde(default = "d_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "d_profile")]
    profile: PathBuf,
    #[serde(default = "d_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default = "d_confirm_timeout", with = "humantime_serde")]
    confirm_timeout: Duration,
    #[serde(default = "d_stall_timeout", with = "humantime_serde")]
    stall_timeout: Duration,
    #[serde(default = "d_run_timeout", with = "humantime_serde")]
    run_timeout: Duration,
    #[serde(default = "d_current_system")]
    current_system: PathBuf,
    #[serde(default = "d_files_root")]
    files_root: PathBuf,
    #[serde(default)]
    trusted_keys: Vec<String>,
    #[serde(default)]
    cache_keys: Vec<String>,
    #[serde(default)]
    min_serial: u64,
    #[serde(default)]
    reboot_command: Option<Vec<String>>,
    #[serde(default = "d_booted_system")]
    booted_system: PathBuf,
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
fn d_connect_timeout() -> Duration {
    Duration::from_secs(20)
}
fn d_confirm_timeout() -> Duration {
    Duration::from_secs(60)
}
/// A minute without an answer to one request: far beyond any round trip, short enough that
/// a stalled server costs a timer run a minute, not the machine its updates.
fn d_stall_timeout() -> Duration {
    Duration::from_secs(60)
}
/// Four hours: a local build of a whole system (a kernel from source on a small machine)
/// fits; the unit's `TimeoutStartSec` (`units::TIMEOUT_START`) is a little longer, so the
/// agent's own deadline, which reports, comes first.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(4 * 3600);
fn d_run_timeout() -> Duration {
    DEFAULT_RUN_TIMEOUT
}
fn d_current_system() -> PathBuf {
    "/run/current-system".into()
}
fn d_booted_system() -> PathBuf {
    "/run/booted-system".into()
}
fn d_files_root() -> PathBuf {
    "/".into()
}

/// `credentials_file` (for an `s3://` source or `reports`), `ca_file` (for an `s3://` or
/// `https://` source) and `reports` (for an `s3://` or `https://` server): absolute paths;
/// an `s3://` `reports` is kept here as a location (`{host}` in it means this host).
fn s3_options(m: &MachineToml, path: &Path) -> Result<S3Options, ConfigError> {
    let err = |message: String| ConfigError::Parse {
        path: path.to_owned(),
        message,
    };
    let all = || std::iter::once(&m.server).chain(&m.mirrors);
    let reports_s3 = m.reports.as_deref().is_some_and(|r| r.starts_with("s3://"));
    let any_s3 = reports_s3 || all().any(|u| matches!(u, ServerUrl::S3(_)));
    let any_tls = all().any(|u| matches!(u, ServerUrl::S3(_) | ServerUrl::Https(_)));
    for (key, set, allowed, what) in [
        (
            "credentials_file",
            m.credentials_file.is_some(),
            any_s3,
            "an s3:// server or mirror",
        ),
        (
            "ca_file",
            m.ca_file.is_some(),
            any_tls,
            "an s3:// or https:// server or mirror",
        ),
        (
            "reports",
            m.reports.is_some(),
            matches!(m.server, ServerUrl::S3(_) | ServerUrl::Https(_)),
            "an s3:// or https:// server",
        ),
    ] {
        if set && !allowed {
            return Err(err(format!(
                "{key} is for {what}; server = \"{}\" does not use it",
                m.server
            )));
        }
    }
    for (key, p) in [
        ("credentials_file", &m.credentials_file),
        ("ca_file", &m.ca_file),
    ] {
        if let Some(p) = p {
            if !p.is_absolute() {
                return Err(err(format!("{key} = {p:?} must be an absolute path")));
            }
            // A CA certificate is public; the credentials are the host's secret.
            if key == "credentials_file" && p.starts_with("/nix/store") {
                return Err(err(format!(
                    "{key} = {p:?} is in the Nix store, which every user can read: keep it in a root-only file (e.g. /etc/bento/s3-credentials, mode 0600)"
                )));
            }
        }
    }
    let reports = match &m.reports {
        None => None,
        // An https:// server's `reports` may be any writable place (`reports_to`); only an
        // s3:// one is a location here.
        Some(text) if !text.starts_with("s3://") => None,
        Some(text) => {
            let l: crate::sys::s3::Location = text
                .parse()
                .map_err(|e: crate::sys::s3::LocationError| err(format!("reports: {e}")))?;
            Some(
                l.for_host(m.host.as_str())
                    .map_err(|e| err(format!("reports: {e}")))?,
            )
        }
    };
    Ok(S3Options {
        credentials_file: m.credentials_file.clone(),
        reports,
        ca_file: m.ca_file.clone(),
        clock_offset: 0,
    })
}

fn de_url<'de, D: Deserializer<'de>>(d: D) -> Result<ServerUrl, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn de_urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ServerUrl>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect()
}

/// An `s3://` source's `{host}` means this host (its own place in the store).
fn for_host(
    url: ServerUrl,
    host: &HostName,
    key: &str,
    path: &Path,
) -> Result<ServerUrl, ConfigError> {
    match url {
        ServerUrl::S3(l) => Ok(ServerUrl::S3(l.for_host(host.as_str()).map_err(|e| {
            ConfigError::Parse {
                path: path.to_owned(),
                message: format!("{key}: {e}"),
            }
        })?)),
        other => Ok(other),
    }
}

impl AgentConfig {
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message: message.trim_end().to_owned(),
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        let layer =
            SettingsLayer::split_from(&mut table, &SettingsLayer::AGENT_KEYS).map_err(parse_err)?;
        let m: MachineToml =
            settings::from_table_beside(table, &SettingsLayer::AGENT_KEYS).map_err(parse_err)?;
        let s3 = s3_options(&m, path)?;
        let server = for_host(m.server.clone(), &m.host, "server", path)?;
        let mut mirrors = Vec::new();
        for url in &m.mirrors {
            let url = for_host(url.clone(), &m.host, "mirrors", path)?;
            if url == server || mirrors.contains(&url) {
                return Err(ConfigError::Parse {
                    path: path.to_owned(),
                    message: format!("mirrors: {url} is listed twice (or is the server)"),
                });
            }
            mirrors.push(url);
        }
        let reports_to = match (&server, &m.reports) {
            (ServerUrl::Https(_), Some(text)) => {
                let url: ServerUrl = text.parse().map_err(|e: String| ConfigError::Parse {
                    path: path.to_owned(),
                    message: format!("reports: {e}"),
                })?;
                let url = for_host(url, &m.host, "reports", path)?;
                if !url.takes_reports() {
                    return Err(ConfigError::Parse {
                        path: path.to_owned(),
                        message: format!(
                            "reports: {url} is read-only; use an sftp://, s3:// or file:// place"
                        ),
                    });
                }
                Some(url)
            }
            _ => None,
        };
        let config = AgentConfig {
            host: m.host,
            server,
            mirrors,
            s3,
            reports_to,
            identity_file: m.identity_file,
            known_hosts: m.known_hosts,
            state_dir: m.state_dir,
            profile: m.profile,
            connect_timeout: m.connect_timeout,
            confirm_timeout: m.confirm_timeout,
            stall_timeout: m.stall_timeout,
            run_timeout: m.run_timeout,
            current_system: m.current_system,
            files_root: m.files_root,
            trusted_keys: m.trusted_keys,
            cache_keys: m.cache_keys,
            min_serial: m.min_serial,
            reboot_command: m.reboot_command,
            booted_system: m.booted_system,
            settings: layer,
        };
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
        crate::protocol::narinfo::CacheKeys::parse(&config.cache_keys).map_err(|e| {
            ConfigError::Parse {
                path: path.to_owned(),
                message: format!("cache_keys: {e}"),
            }
        })?;
        for (key, d) in [
            ("connect_timeout", config.connect_timeout),
            ("stall_timeout", config.stall_timeout),
            ("run_timeout", config.run_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Parse {
                    path: path.to_owned(),
                    message: format!("{key} must be more than zero"),
                });
            }
        }
        Ok(config)
    }

    /// agent.toml's settings over the built-in defaults: what applies to a version whose
    /// snapshot carries no `bento-host.json`.
    pub fn settings(&self) -> HostSettings {
        HostSettings::resolve(&self.host, &[&self.settings])
    }

    /// The settings that apply to a version: its snapshot's (the sysadmin's word, from
    /// bento.toml) when it has them, agent.toml's otherwise.
    pub fn effective(&self, snapshot: Option<&HostSettings>) -> HostSettings {
        snapshot.cloned().unwrap_or_else(|| self.settings())
    }

    /// SSH settings for an `sftp://` server.
    pub fn ssh_options(&self) -> SshOptions {
        SshOptions {
            identity_file: self.identity_file.clone(),
            known_hosts: self.known_hosts.clone(),
            connect_timeout: self.connect_timeout,
            control_dir: StateDir::new(&self.state_dir).ssh(),
            stall_timeout: self.stall_timeout,
            deadline: None,
            s3: self.s3.clone(),
        }
    }

    /// `server`, then the `mirrors`, in the order a run tries them.
    pub fn sources(&self) -> Vec<ServerUrl> {
        std::iter::once(&self.server)
            .chain(&self.mirrors)
            .cloned()
            .collect()
    }

    /// How one run connects: the connections of its fetch are bounded by `run_timeout`
    /// from now; those of the confirmation after activation only by `stall_timeout`, so a
    /// long build never makes the confirmation fail and roll back.
    pub fn run_connector(&self) -> impl Fn(&ServerUrl, Purpose) -> ConnectResult + '_ {
        let deadline = std::time::Instant::now() + self.run_timeout;
        move |url, purpose| {
            let mut ssh = self.ssh_options();
            if purpose == Purpose::Fetch {
                ssh.deadline = Some(deadline);
            }
            crate::agent::source::connect(url, &ssh)
        }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

/// Reads the settings file of a staged configuration tree, if it has one: the signed
/// settings that [`AgentConfig::effective`] lays over agent.toml.
pub fn snapshot_settings(config_dir: &Path) -> Option<HostSettings> {
    let path = config_dir.join(settings::FILE);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("ignoring {}: {e}", path.display());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_list_is_the_structs_fields() {
        use crate::protocol::settings::{serde_fields, sorted};
        assert_eq!(sorted(&MACHINE_KEYS), serde_fields::<MachineToml>());
    }

    fn parse(t: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(t, Path::new("agent.toml"))
    }

    #[test]
    fn defaults() {
        let c = parse("host = \"alpha\"\nserver = \"sftp://bento-alpha@bento.example.org:22\"\n")
            .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/bento"));
        assert_eq!(c.profile, PathBuf::from("/nix/var/nix/profiles/system"));
        assert_eq!(c.settings().mode, Mode::Switch);
        assert_eq!(c.settings().reboot_at, "04:00");
        assert_eq!(c.connect_timeout, Duration::from_secs(20));
        assert_eq!(c.confirm_timeout, Duration::from_secs(60));
        assert_eq!(c.stall_timeout, Duration::from_secs(60));
        assert_eq!(c.run_timeout, Duration::from_secs(4 * 3600));
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
    fn s3_servers_and_their_keys() {
        let c = parse("host = \"alpha\"\nserver = \"s3://bento-{host}?endpoint=https://s3.example.org\"\nreports = \"s3://bento-reports-{host}?endpoint=https://s3.example.org\"\ncredentials_file = \"/etc/bento/s3-credentials\"\nca_file = \"/etc/bento/ca.pem\"\n")
            .unwrap();
        assert_eq!(
            c.server.to_string(),
            "s3://bento-alpha?endpoint=https://s3.example.org&region=us-east-1"
        );
        assert_eq!(c.s3.reports.unwrap().bucket, "bento-reports-alpha");
        assert_eq!(
            c.s3.credentials_file.as_deref(),
            Some(Path::new("/etc/bento/s3-credentials"))
        );
        let s3 = "host = \"alpha\"\nserver = \"s3://fleet/hosts/alpha?endpoint=https://s3.example.org\"\n";
        for (extra, needle) in [
            ("credentials_file = \"/nix/store/abc-creds\"\n", "Nix store"),
            ("credentials_file = \"creds\"\n", "absolute"),
            (
                "reports = \"s3://x?endpoint=http://s3.example.org\"\n",
                "clear text",
            ),
        ] {
            let err = parse(&format!("{s3}{extra}")).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("agent.toml"),
                "{extra}: {err}"
            );
        }
        let err = parse("host = \"alpha\"\nserver = \"sftp://bento-alpha@h\"\ncredentials_file = \"/etc/bento/s3\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("credentials_file") && err.contains("s3://"),
            "{err}"
        );
        let err = parse("host = \"alpha\"\nserver = \"s3://fleet/x?endpoint=ftp://e\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("https://"), "{err}");
    }

    #[test]
    fn mirrors_are_listed_in_order_and_checked() {
        let c = parse("host = \"alpha\"\nserver = \"sftp://bento-alpha@h\"\nmirrors = [\"https://m.example.org/bento/alpha\", \"s3://fleet/hosts/{host}?endpoint=https://s3.example.org\", \"file:///mnt/usb/alpha\"]\ncredentials_file = \"/etc/bento/s3\"\nca_file = \"/etc/bento/ca.pem\"\n")
            .unwrap();
        let sources: Vec<String> = c.sources().iter().map(|u| u.to_string()).collect();
        assert_eq!(
            sources,
            [
                "sftp://bento-alpha@h:22",
                "https://m.example.org/bento/alpha",
                "s3://fleet/hosts/alpha?endpoint=https://s3.example.org&region=us-east-1",
                "file:///mnt/usb/alpha",
            ]
        );
        let base = "host = \"alpha\"\nserver = \"sftp://bento-alpha@h\"\n";
        for (extra, needle) in [
            ("mirrors = [\"http://m.example.org/alpha\"]\n", "clear text"),
            ("mirrors = [\"ftp://m/alpha\"]\n", "mirrors"),
            ("mirrors = [\"file:///a\", \"file:///a\"]\n", "listed twice"),
            ("mirrors = [\"sftp://bento-alpha@h:22\"]\n", "listed twice"),
            // Nothing on the list uses them.
            (
                "mirrors = [\"file:///a\"]\nca_file = \"/ca.pem\"\n",
                "ca_file",
            ),
            (
                "mirrors = [\"https://m/a\"]\ncredentials_file = \"/etc/s3\"\n",
                "credentials_file",
            ),
        ] {
            let err = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("agent.toml"),
                "{extra}: {err}"
            );
        }
        // Beside a read-only server, `reports` is any writable place; never a read-only one.
        let web = "host = \"alpha\"\nserver = \"https://m.example.org/alpha\"\n";
        let c = parse(&format!("{web}reports = \"sftp://bento-alpha@h\"\n")).unwrap();
        assert_eq!(c.reports_to.unwrap().to_string(), "sftp://bento-alpha@h:22");
        let c = parse(&format!(
            "{web}reports = \"s3://r-{{host}}?endpoint=https://s3.example.org\"\n"
        ))
        .unwrap();
        assert_eq!(c.s3.reports.unwrap().bucket, "r-alpha");
        assert_eq!(
            c.reports_to.unwrap().to_string(),
            "s3://r-alpha?endpoint=https://s3.example.org&region=us-east-1"
        );
        let err = parse(&format!("{web}reports = \"https://other/alpha\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("read-only"), "{err}");
        let err = parse(&format!("{base}reports = \"file:///r\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("reports"), "{err}");
        // A CA file for an https:// mirror is accepted.
        parse(&format!(
            "{base}mirrors = [\"https://m/a\"]\nca_file = \"/ca.pem\"\n"
        ))
        .unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let base = "host = \"alpha\"\nserver = \"file:///srv/x\"\n";
        for (extra, needle) in [
            ("colour = 1\n", "colour"),
            ("mode = \"reboot\"\n", "reboot"),
            ("mode = \"reboot\"\n", "mode"),
            ("connect_timeout = \"soon\"\n", "soon"),
            ("state_dir = \"var\"\n", "state_dir"),
            ("trusted_keys = [\"ssh-ed25519 x\"]\n", "trusted key 1"),
            ("cache_keys = [\"bento-1:AAAA\"]\n", "cache_keys"),
            ("self_update = \"yes\"\n", "self_update"),
            ("confirm_timeout = \"soon\"\n", "confirm_timeout"),
            ("stall_timeout = \"0s\"\n", "stall_timeout"),
            ("run_timeout = \"0s\"\n", "run_timeout"),
            // The interval is the timer's: bento.toml sets it, agent.toml cannot.
            ("interval = \"5m\"\n", "interval"),
        ] {
            let err = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(err.contains(needle), "{extra}: {err}");
            assert!(err.contains("agent.toml"), "{err}");
        }
        let err = parse("host = \"alpha\"\nserver = \"gopher://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sftp://"), "{err}");
        let err = parse("server = \"file:///x\"\n").unwrap_err().to_string();
        assert!(err.contains("host"), "{err}");
    }
}
