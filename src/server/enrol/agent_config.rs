//! `bento agent-config`: one host's agent settings, from bento.toml alone — agent.toml, the
//! server's known_hosts line, or the same as a NixOS `services.bento.agent` block.
//!
//! Invariant: what is rendered is complete for the agent to apply the host's version (server
//! URL, pinned host key, trusted signing key, the cache key of a server-built host); when a
//! piece is missing from bento.toml or its key files, rendering fails naming the key to set,
//! rather than printing settings that cannot work.

use std::fs;
use std::path::PathBuf;

use serde::Serialize;

use crate::server::fleet::{BuildOn, FleetConfig, HostName, NameError};

#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    #[error("bento.toml has no [hosts.{0}]: add the host first (`bento host add {0} --key …`)")]
    UnknownHost(HostName),
    #[error("[server] address is not set in bento.toml: set it to the name or address the hosts reach this server by (e.g. address = \"bento.example.org\")")]
    NoAddress,
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(
        "cannot read the server's host key {path} ([server] host_key in bento.toml): {problem}"
    )]
    HostKey { path: PathBuf, problem: String },
    #[error("cannot read the fleet's signing key {path} ([server] signing_key): {problem}")]
    SigningKey { path: PathBuf, problem: String },
    #[error("host {host} has build_on = \"server\" but [server] cache_key is not set: make one with `bento keygen --cache` and set cache_key in bento.toml")]
    NoCacheKey { host: HostName },
    #[error("cannot read the fleet's cache key ([server] cache_key): {0}")]
    CacheKey(String),
}

/// Where the machine keeps its own files (agent.toml's defaults unless told otherwise).
#[derive(Debug, Clone)]
pub struct MachinePaths {
    pub identity_file: PathBuf,
    pub known_hosts: PathBuf,
}

impl Default for MachinePaths {
    fn default() -> Self {
        Self {
            identity_file: PathBuf::from("/etc/bento/id_ed25519"),
            known_hosts: PathBuf::from("/etc/bento/known_hosts"),
        }
    }
}

/// One host's agent settings.
#[derive(Debug, Clone, Serialize)]
pub struct AgentSettings {
    pub host: HostName,
    pub server: String,
    pub identity_file: PathBuf,
    pub known_hosts: PathBuf,
    /// The line `known_hosts` must hold: the server's host key under the name and port of
    /// `server`.
    pub known_hosts_line: String,
    pub trusted_keys: Vec<String>,
    pub cache_keys: Vec<String>,
}

/// `name` for port 22, `[name]:port` otherwise, as OpenSSH looks a server up in known_hosts.
pub fn known_hosts_name(address: &str, port: u16) -> String {
    if port == 22 {
        address.to_owned()
    } else {
        format!("[{address}]:{port}")
    }
}

/// The settings of `host`'s agent, read from `config` and the key files it names.
pub fn agent_settings(
    config: &FleetConfig,
    host: &HostName,
    paths: &MachinePaths,
) -> Result<AgentSettings, AgentConfigError> {
    if !config.hosts.contains_key(host) {
        return Err(AgentConfigError::UnknownHost(host.clone()));
    }
    let server = &config.server;
    let address = server
        .address
        .as_deref()
        .filter(|a| !a.trim().is_empty())
        .ok_or(AgentConfigError::NoAddress)?;
    let account = config.account(host)?;
    // IPv6 literals go in brackets in a URL; the agent's parser takes them off again.
    let url_host = if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_owned()
    };
    let host_key =
        read_public_key(&server.host_key).map_err(|problem| AgentConfigError::HostKey {
            path: server.host_key.clone(),
            problem,
        })?;
    let trusted_keys = match &server.signing_key {
        None => Vec::new(),
        Some(path) => vec![signing_public(path)?],
    };
    let cache_keys = if config.build_on(host) == BuildOn::Server {
        let path = server
            .cache_key
            .as_ref()
            .ok_or_else(|| AgentConfigError::NoCacheKey { host: host.clone() })?;
        let key = crate::server::delivery::cache::CacheKey::load(path)
            .map_err(|e| AgentConfigError::CacheKey(e.to_string()))?;
        vec![key.public]
    } else {
        Vec::new()
    };
    Ok(AgentSettings {
        host: host.clone(),
        server: format!("sftp://{account}@{url_host}:{}", server.port),
        identity_file: paths.identity_file.clone(),
        known_hosts: paths.known_hosts.clone(),
        known_hosts_line: format!("{} {host_key}", known_hosts_name(address, server.port)),
        trusted_keys,
        cache_keys,
    })
}

/// `type base64` of the first key line of an OpenSSH public key file (its comment dropped:
/// known_hosts has no use for it).
fn read_public_key(path: &std::path::Path) -> Result<String, String> {
    let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or("the file holds no key")?;
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some(kind), Some(b64)) if kind.starts_with("ssh-") || kind.starts_with("ecdsa-") => {
            Ok(format!("{kind} {b64}"))
        }
        _ => Err("not an OpenSSH public key (type base64 [comment])".to_owned()),
    }
}

/// The signing key's public half: `<key>.pub` as `bento keygen` writes it, else derived
/// from the private key.
fn signing_public(path: &std::path::Path) -> Result<String, AgentConfigError> {
    let err = |problem: String| AgentConfigError::SigningKey {
        path: path.to_owned(),
        problem,
    };
    let pub_path = crate::protocol::signing::pub_path(path);
    if let Ok(line) = read_public_key(&pub_path) {
        return Ok(line);
    }
    let signer = crate::protocol::signing::Signer::load(path).map_err(|e| err(e.to_string()))?;
    let public = signer.public();
    let mut line = public.to_openssh().map_err(|e| err(e.to_string()))?;
    // The comment is not part of the key; keep it out so the line matches `.pub`'s key part.
    if let Some((kind_b64, _)) = line.rsplit_once(' ').filter(|(k, _)| k.contains(' ')) {
        line = kind_b64.to_owned();
    }
    Ok(line)
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn toml_list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| toml_string(s)).collect();
    format!("[{}]", items.join(", "))
}

fn nix_string(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace("${", "\\${");
    format!("\"{escaped}\"")
}

fn nix_list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| nix_string(s)).collect();
    format!("[ {} ]", items.join(" "))
}

impl AgentSettings {
    /// agent.toml, ready to be written as it is.
    pub fn agent_toml(&self) -> String {
        let mut text = format!(
            "# bento agent settings for host {host} (`bento agent-config {host}` on the server).\n\
             # Goes to /etc/bento/agent.toml; {kh} must hold the server's host key line:\n\
             #   {line}\n\
             host = {h}\n\
             server = {server}\n\
             identity_file = {id}\n\
             known_hosts = {khs}\n",
            host = self.host,
            kh = self.known_hosts.display(),
            line = self.known_hosts_line,
            h = toml_string(self.host.as_str()),
            server = toml_string(&self.server),
            id = toml_string(&self.identity_file.display().to_string()),
            khs = toml_string(&self.known_hosts.display().to_string()),
        );
        if self.trusted_keys.is_empty() {
            text.push_str(
                "# No [server] signing_key in bento.toml: manifests are applied unsigned.\n",
            );
        }
        text.push_str(&format!(
            "trusted_keys = {}\n",
            toml_list(&self.trusted_keys)
        ));
        if !self.cache_keys.is_empty() {
            text.push_str(&format!("cache_keys = {}\n", toml_list(&self.cache_keys)));
        }
        text
    }

    /// The same settings as a `services.bento.agent` block for the host's configuration.
    pub fn nixos(&self) -> String {
        let mut text = format!(
            "# For host {host}'s configuration (with bento's NixOS module imported). In a module\n\
             # every host imports, only `host` differs: `host = config.networking.hostName;`.\n\
             services.bento.agent = {{\n  enable = true;\n  host = {h};\n  server = {server};\n  identityFile = {id};\n  knownHosts = {line};\n  trustedKeys = {trusted};\n",
            host = self.host,
            h = nix_string(self.host.as_str()),
            server = nix_string(&self.server),
            id = nix_string(&self.identity_file.display().to_string()),
            line = nix_string(&self.known_hosts_line),
            trusted = nix_list(&self.trusted_keys),
        );
        if !self.cache_keys.is_empty() {
            text.push_str(&format!("  cacheKeys = {};\n", nix_list(&self.cache_keys)));
        }
        text.push_str("};\n");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const HOST_KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHyvBNWS0tUTjrP3DxEx8bnhSwa7hvxOHgTSxBqYpMCy root@srv";

    fn config(t: &Path, server: &str) -> FleetConfig {
        fs::write(t.join("host_key.pub"), format!("{HOST_KEY}\n")).unwrap();
        let text = format!(
            "[server]\nhost_key = \"{}\"\n{server}\n[hosts.alpha]\n",
            t.join("host_key.pub").display()
        );
        FleetConfig::parse(&text, Path::new("bento.toml")).unwrap()
    }

    fn alpha() -> HostName {
        HostName::new("alpha").unwrap()
    }

    #[test]
    fn renders_an_agent_toml_the_agent_reads_back() {
        let t = tempfile::tempdir().unwrap();
        let c = config(t.path(), "address = \"srv.example.org\"\nport = 2222");
        let s = agent_settings(&c, &alpha(), &MachinePaths::default()).unwrap();
        assert_eq!(s.server, "sftp://bento-alpha@srv.example.org:2222");
        assert_eq!(
            s.known_hosts_line,
            format!(
                "[srv.example.org]:2222 {}",
                HOST_KEY.rsplit_once(' ').unwrap().0
            )
        );
        let text = s.agent_toml();
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(parsed["host"].as_str(), Some("alpha"));
        assert_eq!(
            parsed["known_hosts"].as_str(),
            Some("/etc/bento/known_hosts")
        );
        // Port 22: no brackets.
        let c = config(t.path(), "address = \"srv.example.org\"");
        let s = agent_settings(&c, &alpha(), &MachinePaths::default()).unwrap();
        assert!(s
            .known_hosts_line
            .starts_with("srv.example.org ssh-ed25519 "));
        assert!(s
            .nixos()
            .contains("server = \"sftp://bento-alpha@srv.example.org:22\";"));
    }

    #[test]
    fn missing_pieces_name_the_setting_to_fix() {
        let t = tempfile::tempdir().unwrap();
        let c = config(t.path(), "");
        let err = agent_settings(&c, &alpha(), &MachinePaths::default()).unwrap_err();
        assert!(err.to_string().contains("[server] address"), "{err}");
        let c = config(t.path(), "address = \"srv\"");
        let err = agent_settings(
            &c,
            &HostName::new("beta").unwrap(),
            &MachinePaths::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bento host add beta"), "{err}");
        let c = config(
            t.path(),
            "address = \"srv\"\n[defaults]\nbuild_on = \"server\"",
        );
        let err = agent_settings(&c, &alpha(), &MachinePaths::default()).unwrap_err();
        assert!(err.to_string().contains("bento keygen --cache"), "{err}");
        let mut c = config(t.path(), "address = \"srv\"");
        c.server.host_key = t.path().join("missing.pub");
        let err = agent_settings(&c, &alpha(), &MachinePaths::default()).unwrap_err();
        assert!(err.to_string().contains("[server] host_key"), "{err}");
    }
}
