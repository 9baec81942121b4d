//! `bento agent check`: everything an update needs, checked in the order an update meets it
//! (agent.toml, the machine's key, the server's host key, the connection, the live manifest,
//! its signature, the binary-cache keys), each finding one line saying what is wrong and
//! how to fix it.
//!
//! Invariant: read-only. It writes nothing on the machine but ssh's control socket under
//! the state directory, and on the server it only reads.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use serde::Serialize;

use super::config::AgentConfig;
use super::fetch;
use super::source::{self, RemoteError, ServerUrl};
use crate::protocol::layout;
use crate::protocol::manifest::{Manifest, ManifestError};
use crate::protocol::signing;
use crate::sys::process::Cmd;

/// How one finding weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Works, but not as it should (unsigned manifests).
    Warn,
    /// An update would fail (or never happen) because of it.
    Fail,
}

/// One line of the check.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub level: Level,
    /// What was checked (`agent.toml`, `identity_file`, `known_hosts`, `connection`,
    /// `manifest`, `signature`, `cache_keys`).
    pub check: &'static str,
    /// What was found, with the fix when something is wrong.
    pub message: String,
}

fn ok(check: &'static str, message: String) -> Finding {
    Finding {
        level: Level::Ok,
        check,
        message,
    }
}
fn fail(check: &'static str, message: String) -> Finding {
    Finding {
        level: Level::Fail,
        check,
        message,
    }
}
fn warn(check: &'static str, message: String) -> Finding {
    Finding {
        level: Level::Warn,
        check,
        message,
    }
}

/// Runs every check the earlier ones allow (no connection without a usable config).
pub fn check(config_path: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    let cfg = match AgentConfig::load(config_path) {
        Ok(cfg) => cfg,
        Err(e) => {
            out.push(fail(
                "agent.toml",
                format!("{e}: fix it (every key: docs/reference.md), or print it afresh on the server with `bento agent-config HOST`"),
            ));
            return out;
        }
    };
    out.push(ok(
        "agent.toml",
        format!(
            "{}: host {}, server {}",
            config_path.display(),
            cfg.host,
            cfg.server
        ),
    ));
    let mut usable = true;
    if let ServerUrl::Sftp { host, port, .. } = &cfg.server {
        let key = identity(&cfg);
        usable &= key.level != Level::Fail;
        out.push(key);
        let known = known_hosts(&cfg, host, *port);
        usable &= known.level != Level::Fail;
        out.push(known);
    }
    if !usable {
        return out;
    }
    let mut conn = match source::connect(&cfg.server, &cfg.ssh_options()) {
        Ok(conn) => conn,
        Err(e) => {
            out.push(fail("connection", connect_problem(&cfg, &e)));
            return out;
        }
    };
    out.push(ok("connection", format!("logged in to {}", cfg.server)));
    out.extend(live_version(&cfg, conn.as_mut()));
    out
}

/// The machine's key: there, a key, and private to its owner (ssh refuses it otherwise).
fn identity(cfg: &AgentConfig) -> Finding {
    let path = &cfg.identity_file;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return fail(
                "identity_file",
                format!(
                    "{}: {e}: make the machine's key with `bento agent init`",
                    path.display()
                ),
            )
        }
    };
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return fail(
            "identity_file",
            format!(
                "{} has mode {mode:04o}: ssh ignores a private key others can read; run `chmod 600 {}`",
                path.display(),
                path.display()
            ),
        );
    }
    let euid = crate::sys::accounts::euid();
    if meta.uid() != euid {
        return fail(
            "identity_file",
            format!(
                "{} belongs to uid {}, not to the agent's user (uid {euid}): run `chown {euid} {}`",
                path.display(),
                meta.uid(),
                path.display()
            ),
        );
    }
    match ssh_key::PrivateKey::read_openssh_file(path) {
        Ok(key) => ok(
            "identity_file",
            format!(
                "{} ({}, mode {mode:04o})",
                path.display(),
                key.public_key().fingerprint(Default::default())
            ),
        ),
        Err(e) => fail(
            "identity_file",
            format!(
                "{} is not an OpenSSH private key ({e}): make one with `bento agent init`",
                path.display()
            ),
        ),
    }
}

/// `name` for port 22, `[name]:port` otherwise: what ssh looks up.
fn known_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// known_hosts holds a line for the server under the name ssh looks up.
fn known_hosts(cfg: &AgentConfig, host: &str, port: u16) -> Finding {
    let file = &cfg.known_hosts;
    let name = known_name(host, port);
    let fix = format!(
        "add the line `bento agent-config {}` prints on the server (it starts with {name})",
        cfg.host
    );
    if !file.is_file() {
        return fail(
            "known_hosts",
            format!("{} does not exist: {fix}", file.display()),
        );
    }
    let found = Cmd::new("ssh-keygen")
        .arg("-F")
        .arg(&name)
        .arg("-f")
        .arg(file)
        .timeout(std::time::Duration::from_secs(10))
        .run();
    match found {
        Ok(out) if !out.stdout_text().trim().is_empty() => ok(
            "known_hosts",
            format!("{} has a key for {name}", file.display()),
        ),
        _ => fail(
            "known_hosts",
            format!("{} has no key for {name}: {fix}", file.display()),
        ),
    }
}

/// The failed connection in words, with the fix for its usual causes.
fn connect_problem(cfg: &AgentConfig, e: &RemoteError) -> String {
    let text = e.to_string();
    let lower = text.to_lowercase();
    let host = &cfg.host;
    if lower.contains("host key verification failed")
        || lower.contains("remote host identification has changed")
        || lower.contains("host key for")
    {
        format!(
            "the server's host key is not the one in {}: replace its line with the one `bento agent-config {host}` prints on the server (compare with the server's /etc/ssh/ssh_host_ed25519_key.pub) ({})",
            cfg.known_hosts.display(),
            last_line(&text)
        )
    } else if lower.contains("permission denied") {
        format!(
            "the server refused this machine's key: on the server, check that [hosts.{host}] has this machine's key (`bento host add {host} --key-file {}.pub`) and that the account exists (`bento server sync-accounts`) ({})",
            cfg.identity_file.display(),
            last_line(&text)
        )
    } else {
        format!(
            "cannot reach {}: check `server` in agent.toml ([server] address and port on the server) and that the server's sshd runs and the network lets this machine through ({})",
            cfg.server,
            last_line(&text)
        )
    }
}

fn last_line(text: &str) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    crate::sys::terminal::escape(line).into_owned()
}

/// The live version: published, for this host, signed by a trusted key, and substitutable
/// when the server built it.
fn live_version(cfg: &AgentConfig, conn: &mut dyn source::Connection) -> Vec<Finding> {
    let host = &cfg.host;
    let text = match fetch::current(conn) {
        Ok(Some(text)) => text,
        Ok(None) => {
            return vec![fail(
                "manifest",
                format!(
                    "nothing is published for host {host} yet: run `bento publish` on the server"
                ),
            )]
        }
        Err(e) => return vec![fail("manifest", format!("cannot read current: {e}"))],
    };
    let Ok(digest) = layout::parse_current(&text) else {
        return vec![fail(
            "manifest",
            "current on the server is not a version digest: publish again on the server".into(),
        )];
    };
    let bytes = match fetch::manifest(conn, digest) {
        Ok(b) => b,
        Err(e) => return vec![fail("manifest", format!("version {}: {e}", digest.short()))],
    };
    let manifest = match Manifest::parse_untrusted(&bytes, &digest, host) {
        Ok(m) => m,
        Err(ManifestError::WrongHost { found, .. }) => {
            return vec![fail(
                "manifest",
                format!(
                    "agent.toml says host = \"{host}\" but {} serves host {found}'s versions: set host = \"{found}\" in agent.toml, or make `server` name {host}'s account",
                    cfg.server
                ),
            )]
        }
        Err(e) => return vec![fail("manifest", format!("version {}: {e}", digest.short()))],
    };
    let mut out = vec![ok(
        "manifest",
        format!(
            "version {} of host {host}, published {}",
            digest.short(),
            manifest.created
        ),
    )];
    out.push(signature(cfg, conn, &bytes, digest));
    out.push(match super::substitute::prebuilt(conn, &manifest) {
        Ok(Some(system)) if cfg.cache_keys.is_empty() => fail(
            "cache_keys",
            format!(
                "the live version is built by the server ({system}) but cache_keys is empty, so it would be refused: add the cache key `bento agent-config {host}` prints on the server"
            ),
        ),
        Ok(Some(system)) => cache_signature(cfg, conn, system.as_str()),
        Ok(None) => ok("cache_keys", "the live version is built on this machine".into()),
        Err(e) => fail("cache_keys", format!("cannot read the server's cache: {e}")),
    });
    out
}

/// The top narinfo of a server-built system is signed by one of `cache_keys` (the agent
/// checks every narinfo of the closure before it fetches a NAR; the top one tells a wrong key).
fn cache_signature(cfg: &AgentConfig, conn: &mut dyn source::Connection, system: &str) -> Finding {
    use crate::protocol::narinfo::{self, CacheKeys, NarInfo, MAX_NARINFO_BYTES};
    let fix = format!(
        "set cache_keys to what `bento agent-config {}` prints on the server",
        cfg.host
    );
    let Some(file) = source::CacheFile::narinfo(narinfo::hash_part(system)) else {
        return fail(
            "cache_keys",
            format!("{system}: not a store path the cache can name"),
        );
    };
    let bytes = match conn.read(source::Item::Cache(file), MAX_NARINFO_BYTES as u64) {
        Ok(Some(b)) => b,
        Ok(None) => return fail("cache_keys", format!("{system}: its narinfo is gone from the server's cache: publish again on the server")),
        Err(e) => return fail("cache_keys", format!("cannot read the server's cache: {e}")),
    };
    let verified = CacheKeys::parse(&cfg.cache_keys)
        .and_then(|keys| NarInfo::parse(&String::from_utf8_lossy(&bytes))?.verify(&keys));
    match verified {
        Ok(()) => ok(
            "cache_keys",
            format!("the server's build {system} is signed by a key in cache_keys"),
        ),
        Err(e) => fail("cache_keys", format!("{system}: {e}: {fix}")),
    }
}

fn signature(
    cfg: &AgentConfig,
    conn: &mut dyn source::Connection,
    bytes: &[u8],
    digest: crate::protocol::manifest::Digest,
) -> Finding {
    let host = &cfg.host;
    let sig = match fetch::signature(conn, digest) {
        Ok(sig) => sig,
        Err(e) => return fail("signature", format!("cannot read the signature: {e}")),
    };
    let fix = format!("set trusted_keys to what `bento agent-config {host}` prints on the server");
    match (cfg.trusted_keys.is_empty(), sig) {
        (true, Some(_)) => fail(
            "signature",
            format!("the fleet signs its manifests but trusted_keys is empty, so this machine would apply anything written to its chroot: {fix}"),
        ),
        (true, None) => warn(
            "signature",
            "the fleet does not sign its manifests and trusted_keys is empty: versions are applied unsigned (`bento keygen` on the server, then trusted_keys here)".into(),
        ),
        (false, None) => fail(
            "signature",
            "version is not signed, and the agent refuses unsigned versions: set [server] signing_key in bento.toml and publish again".into(),
        ),
        (false, Some(sig)) => {
            let verified = signing::parse_trusted(&cfg.trusted_keys)
                .map_err(|e| e.to_string())
                .and_then(|keys| signing::verify(&keys, bytes, &sig).map_err(|e| e.to_string()));
            match verified {
                Ok(()) => ok("signature", "signed by a key in trusted_keys".into()),
                Err(e) => fail("signature", format!("{e}: {fix}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_names_bracket_other_ports() {
        assert_eq!(known_name("srv", 22), "srv");
        assert_eq!(known_name("srv", 2222), "[srv]:2222");
    }

    #[test]
    fn a_config_that_does_not_load_is_one_failure_with_the_fix() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("agent.toml");
        std::fs::write(&path, "host = \"alpha\"\nserver = \"ftp://x\"\n").unwrap();
        let found = check(&path);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].level, Level::Fail);
        assert!(found[0].message.contains("agent.toml"), "{:?}", found[0]);
        assert!(
            found[0].message.contains("bento agent-config"),
            "{:?}",
            found[0]
        );
    }

    #[test]
    fn a_key_others_can_read_is_named_with_chmod() {
        use std::os::unix::fs::PermissionsExt as _;
        let t = tempfile::tempdir().unwrap();
        let key = t.path().join("id");
        crate::protocol::signing::generate(&key, "m").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = t.path().join("agent.toml");
        std::fs::write(
            &path,
            format!(
                "host = \"alpha\"\nserver = \"sftp://bento-alpha@127.0.0.1:9\"\nidentity_file = \"{}\"\nknown_hosts = \"{}\"\n",
                key.display(),
                t.path().join("kh").display()
            ),
        )
        .unwrap();
        let found = check(&path);
        let bad = found.iter().find(|f| f.check == "identity_file").unwrap();
        assert_eq!(bad.level, Level::Fail);
        assert!(
            bad.message
                .contains(&format!("chmod 600 {}", key.display())),
            "{bad:?}"
        );
        // No connection is tried with a key ssh would refuse.
        assert!(found.iter().all(|f| f.check != "connection"), "{found:?}");
    }
}
