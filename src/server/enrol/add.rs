//! `bento host add`: a new `[hosts.NAME]` in bento.toml and the host's directory.
//!
//! Invariant: bento.toml changes only by text appended at its end, and only after the whole
//! result has parsed as a fleet holding exactly one more host; every byte already in the file
//! (comments, layout, key order) stays where it was. A document editor that re-renders
//! (toml_edit) moves the comments trailing the last table below the new one, so the table is
//! appended as text, its values encoded by the `toml` crate.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::server::fleet::{
    account_name, Fleet, FleetConfig, FleetError, HostName, FLEET_FILE, HOSTS_DIR,
};
use crate::server::provision::{KeyError, PublicKey};
use crate::server::select::{SelectError, Tag};

#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The same words `bento.toml` loading (and so `sync-accounts`) uses for a bad name.
    #[error(transparent)]
    Name(FleetError),
    /// The same words `sync-accounts` uses for a bad or shared key.
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{path} already has [hosts.{host}]; change its key or tags there")]
    Exists { path: PathBuf, host: HostName },
    #[error(transparent)]
    Tag(#[from] SelectError),
    #[error("{path}: [hosts.{host}] cannot be appended to this file ({message}); add it by hand")]
    Append {
        path: PathBuf,
        host: HostName,
        message: String,
    },
    #[error("--flake {dir}: no flake.nix there; --flake names a flake directory of the fleet (hosts/<dir>)")]
    NoFlake { dir: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AddError + '_ {
    move |source| AddError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What `bento host add` was asked for.
#[derive(Debug, Clone)]
pub struct AddRequest<'a> {
    pub name: &'a str,
    /// One OpenSSH public key line (the machine's `/etc/bento/id_ed25519.pub`).
    pub key: &'a str,
    pub tags: &'a [String],
    /// A flake directory (under `hosts/`, or a path to one) that defines the host, instead
    /// of a new `hosts/NAME/configuration.nix`.
    pub flake: Option<&'a Path>,
}

/// What was done.
#[derive(Debug, Clone)]
pub struct Added {
    pub host: HostName,
    /// Files and links made for the host's directory (empty when it existed or a flake
    /// directory defines the host).
    pub created: Vec<PathBuf>,
    /// The flake directory that is to define the host, relative to the fleet root.
    pub flake: Option<PathBuf>,
    /// The fleet as it is now (bento.toml re-read).
    pub config: FleetConfig,
}

/// The `[hosts.NAME]` table as appended: a blank line, the header, `key`, and `tags`.
/// `key` is the validated key line, as given (its comment kept).
pub fn host_table(host: &HostName, key: &str, tags: &[Tag]) -> String {
    let string = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let mut text = format!("\n[hosts.{host}]\nkey = {}\n", string(key));
    if !tags.is_empty() {
        let list: Vec<String> = tags.iter().map(|t| string(t.as_str())).collect();
        text.push_str(&format!("tags = [{}]\n", list.join(", ")));
    }
    text
}

/// `text` with `table` appended, after a newline if the file does not end with one.
pub fn appended(text: &str, table: &str) -> String {
    let mut out = String::with_capacity(text.len() + table.len() + 1);
    out.push_str(text);
    if !text.is_empty() && !text.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(table);
    out
}

/// Adds the host to the fleet: refuses what `sync-accounts` would refuse, appends the table,
/// and creates `hosts/NAME/` from `bento init`'s example (unless a flake directory is named
/// or the directory already exists). Nothing is written when anything is refused.
pub fn add_host(fleet: &Fleet, req: &AddRequest<'_>) -> Result<Added, AddError> {
    let toml_path = fleet.root.join(FLEET_FILE);
    let config = &fleet.config;
    let name_err = |source| {
        AddError::Name(FleetError::Name {
            path: toml_path.clone(),
            source,
        })
    };
    let host = HostName::new(req.name).map_err(name_err)?;
    account_name(&config.server.account_prefix, &host).map_err(name_err)?;
    if config.hosts.contains_key(&host) {
        return Err(AddError::Exists {
            path: toml_path,
            host,
        });
    }
    let key = PublicKey::parse(&host, req.key)?;
    for (other, hc) in &config.hosts {
        let theirs = hc.key.as_deref().map(|k| PublicKey::parse(other, k));
        if let Some(Ok(theirs)) = theirs {
            if theirs.same_key(&key) {
                return Err(KeyError::Duplicate {
                    first: other.clone(),
                    second: host,
                }
                .into());
            }
        }
    }
    let tags = req
        .tags
        .iter()
        .map(|t| Tag::new(t))
        .collect::<Result<Vec<_>, _>>()?;
    let flake = match req.flake {
        Some(dir) => Some(flake_dir(&fleet.root, dir)?),
        None => None,
    };

    let text = fs::read_to_string(&toml_path).map_err(io_err(&toml_path))?;
    let new_text = appended(&text, &host_table(&host, req.key.trim(), &tags));
    let append_err = |message: String| AddError::Append {
        path: toml_path.clone(),
        host: host.clone(),
        message,
    };
    let new_config =
        FleetConfig::parse(&new_text, &toml_path).map_err(|e| append_err(e.to_string()))?;
    // The file's other tables must read as before: appending to a file whose `hosts` is an
    // inline table or dotted keys would either fail above or change what they mean.
    let mut without = new_config.clone();
    without.hosts.remove(&host);
    if &without != config || !new_config.hosts.contains_key(&host) {
        return Err(append_err(
            "the result would not read as the same fleet plus this host".to_owned(),
        ));
    }

    let created = match &flake {
        Some(_) => Vec::new(),
        None => host_dir(&fleet.root, &host)?,
    };
    if let Err(e) =
        crate::sys::atomic::write_file(&toml_path, new_text.as_bytes(), file_mode(&toml_path))
    {
        // bento.toml is unchanged: take the directory back out, so nothing is half-made.
        for path in created.iter().rev() {
            let _ = fs::remove_file(path);
        }
        let _ = fs::remove_dir(fleet.root.join(HOSTS_DIR).join(host.as_str()));
        return Err(io_err(&toml_path)(e));
    }
    Ok(Added {
        host,
        created,
        flake,
        config: new_config,
    })
}

/// bento.toml keeps its mode (a group-readable file stays so).
fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644)
}

/// `--flake DIR` as a directory of the fleet holding flake.nix, relative to the fleet root.
fn flake_dir(root: &Path, dir: &Path) -> Result<PathBuf, AddError> {
    let candidates = [
        root.join(HOSTS_DIR).join(dir),
        root.join(dir),
        std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned()),
    ];
    for c in candidates {
        if c.join("flake.nix").is_file() {
            let abs = fs::canonicalize(&c).map_err(io_err(&c))?;
            if let Ok(rel) = abs.strip_prefix(root) {
                return Ok(rel.to_owned());
            }
        }
    }
    Err(AddError::NoFlake {
        dir: dir.to_owned(),
    })
}

/// `hosts/NAME/` from `bento init`'s example when it does not exist yet; returns what it
/// made (nothing when the directory is already there).
fn host_dir(root: &Path, host: &HostName) -> Result<Vec<PathBuf>, AddError> {
    let dir = root.join(HOSTS_DIR).join(host.as_str());
    if dir.exists() {
        return Ok(Vec::new());
    }
    let mut created = Vec::new();
    let result = (|| {
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let config = dir.join("configuration.nix");
        fs::write(
            &config,
            crate::server::init::example_configuration(host.as_str()),
        )
        .map_err(io_err(&config))?;
        created.push(config);
        if root.join("common").is_dir() {
            let link = dir.join("common");
            std::os::unix::fs::symlink("../../common", &link).map_err(io_err(&link))?;
            created.push(link);
        }
        Ok(())
    })();
    if let Err(e) = result {
        for path in created.iter().rev() {
            let _ = fs::remove_file(path);
        }
        let _ = fs::remove_dir(&dir);
        return Err(e);
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHyvBNWS0tUTjrP3DxEx8bnhSwa7hvxOHgTSxBqYpMCy m@x";
    const OTHER: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA0kBEm1xzcRqEXfYfCr64nSwAXGW0BRiRkVYyYZD+oL";

    fn fleet(text: &str) -> (tempfile::TempDir, Fleet) {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join(FLEET_FILE), text).unwrap();
        fs::create_dir_all(t.path().join("common")).unwrap();
        let f = Fleet::load(t.path()).unwrap();
        (t, f)
    }

    fn req<'a>(name: &'a str, key: &'a str, tags: &'a [String]) -> AddRequest<'a> {
        AddRequest {
            name,
            key,
            tags,
            flake: None,
        }
    }

    #[test]
    fn every_other_byte_of_a_commented_file_is_kept() {
        // Comments before, between and after tables, odd spacing, a file without a final
        // newline, and a trailing comment under the last table.
        let text = "# fleet\n[server]   # the server\naccount_prefix = \"bento-\"  # prefix\n\n[hosts.old]\n# key = \"ssh-ed25519 AAAA... root@old\"\ntags=[ \"web\" ]\n\n[rollout]\nwaves = [\"@web\"]\n# the end";
        let (t, f) = fleet(text);
        let tags = vec!["db".to_owned(), "eu-1".to_owned()];
        let added = add_host(&f, &req("alpha", KEY, &tags)).unwrap();
        let after = fs::read_to_string(t.path().join(FLEET_FILE)).unwrap();
        assert!(after.starts_with(text), "{after}");
        let rest = &after[text.len()..];
        assert_eq!(
            rest,
            format!("\n\n[hosts.alpha]\nkey = \"{KEY}\"\ntags = [\"db\", \"eu-1\"]\n")
        );
        let alpha = HostName::new("alpha").unwrap();
        let reread = Fleet::load(t.path()).unwrap().config;
        assert_eq!(reread.hosts[&alpha].key.as_deref(), Some(KEY));
        assert_eq!(reread.hosts[&alpha].tags.len(), 2);
        assert_eq!(reread, added.config);
        // The example host came from bento init's example, named after the host.
        let conf = fs::read_to_string(t.path().join("hosts/alpha/configuration.nix")).unwrap();
        assert!(conf.contains("\"alpha\""), "{conf}");
        assert_eq!(
            fs::read_link(t.path().join("hosts/alpha/common")).unwrap(),
            Path::new("../../common")
        );
    }

    #[test]
    fn refuses_what_sync_accounts_refuses_and_writes_nothing() {
        let text = format!("[hosts.old]\nkey = \"{OTHER}\"\n");
        let (t, f) = fleet(&text);
        let cases: [(&str, &str, &[String], &str); 6] = [
            ("Bad_Name", KEY, &[], "Bad_Name"),
            (
                "averyveryverylonghostnamethatistoolong",
                KEY,
                &[],
                "at most",
            ),
            ("old", KEY, &[], "already has [hosts.old]"),
            (
                "new",
                "ssh-dss AAAA",
                &[],
                "key type \"ssh-dss\" is not accepted",
            ),
            ("new", OTHER, &[], "hosts old and new have the same key"),
            ("new", KEY, &["Bad Tag".to_owned()], "Bad Tag"),
        ];
        for (name, key, tags, needle) in cases {
            let err = add_host(&f, &req(name, key, tags)).unwrap_err().to_string();
            assert!(err.contains(needle), "{name}: {err}");
            assert_eq!(fs::read_to_string(t.path().join(FLEET_FILE)).unwrap(), text);
            assert!(!t.path().join("hosts").exists(), "{name}: nothing made");
        }
        // The same message sync-accounts gives for the same key.
        let mut config = f.config.clone();
        config.hosts.insert(
            HostName::new("new").unwrap(),
            crate::server::fleet::HostConfig {
                key: Some("ssh-dss AAAA".into()),
                ..Default::default()
            },
        );
        let sync = crate::server::provision::fleet_keys(&config)
            .unwrap_err()
            .to_string();
        let add = add_host(&f, &req("new", "ssh-dss AAAA", &[]))
            .unwrap_err()
            .to_string();
        assert_eq!(sync, add);
    }

    #[test]
    fn an_inline_hosts_table_is_refused_not_rewritten() {
        let text = format!("hosts = {{ old = {{ key = \"{OTHER}\" }} }}\n");
        let (t, f) = fleet(&text);
        let err = add_host(&f, &req("alpha", KEY, &[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("add it by hand"), "{err}");
        assert_eq!(fs::read_to_string(t.path().join(FLEET_FILE)).unwrap(), text);
    }
}
