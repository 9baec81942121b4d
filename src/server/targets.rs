//! Which hosts a server command acts on, from what bento.toml and the chroot say: the hosts
//! known (named in bento.toml or with a chroot directory), their tags, and the held ones
//! (`hold = true`). Selectors themselves are `server::select`.

use std::collections::BTreeSet;
use std::path::Path;

use crate::protocol::HostName;
use crate::server::fleet::FleetConfig;
use crate::server::select::Tags;

/// Every host's tags, from bento.toml.
pub fn tags(config: &FleetConfig) -> Tags {
    config
        .hosts
        .iter()
        .filter(|(_, h)| !h.tags.is_empty())
        .map(|(n, h)| (n.clone(), h.tags.clone()))
        .collect()
}

/// Hosts named in bento.toml or having a directory in the chroot that `sync-accounts
/// --prune` did not retire, sorted (what `status`, `trigger` and `rollback` select from).
pub fn known_hosts(config: &FleetConfig, chroot_root: &Path) -> std::io::Result<Vec<HostName>> {
    let mut names: BTreeSet<HostName> = config.hosts.keys().cloned().collect();
    match std::fs::read_dir(chroot_root) {
        Ok(rd) => {
            for entry in rd {
                let entry = entry?;
                // `.bento` and temporaries are not host names.
                if let Some(h) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| HostName::new(n).ok())
                {
                    // A directory `sync-accounts --prune` retired is no host any more.
                    if entry.file_type()?.is_dir()
                        && (names.contains(&h)
                            || !crate::server::chroot::is_sealed(&entry.metadata()?))
                    {
                        names.insert(h);
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(names.into_iter().collect())
}

/// Hosts with `hold = true` in bento.toml.
pub fn held(config: &FleetConfig) -> BTreeSet<HostName> {
    config
        .hosts
        .iter()
        .filter(|(_, h)| h.hold)
        .map(|(n, _)| n.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: &str) -> HostName {
        HostName::new(n).unwrap()
    }

    #[test]
    fn tags_from_bento_toml() {
        let c = FleetConfig::parse(
            "[hosts.a]\ntags = [\"canary\", \"lab\"]\nhold = true\naddress = \"10.0.0.5\"\n[hosts.b]\n",
            Path::new("bento.toml"),
        )
        .unwrap();
        let t = tags(&c);
        assert_eq!(t[&h("a")].len(), 2);
        assert!(!t.contains_key(&h("b")));
        assert_eq!(held(&c), [h("a")].into_iter().collect());
        let err = FleetConfig::parse("[hosts.a]\ntags = [\"Bad Tag\"]\n", Path::new("bento.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("Bad Tag"), "{err}");
    }
}
