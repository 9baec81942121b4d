//! The sshd policy for host accounts, rendered as `sshd_config` text. The same `Match` block
//! goes into the NixOS module and into `bento server sshd-config`, so both servers enforce
//! exactly the same rules; `check` reads sshd's effective config back against it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::server::fleet::ServerConfig;

use super::{FORCE_COMMAND, MAX_SESSIONS, MAX_STARTUPS, PER_SOURCE_MAX_STARTUPS};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("[server] {key} = {path:?} must be an absolute path")]
    Relative { key: &'static str, path: PathBuf },
    #[error("[server] {key} = {path:?} may only contain letters, digits and / . _ - + @ (it goes into sshd_config, tmpfiles and Nix strings unquoted)")]
    Characters { key: &'static str, path: PathBuf },
}

/// Checks a path that is written unquoted into sshd_config, tmpfiles rules and Nix strings.
pub fn check_config_path(key: &'static str, path: &Path) -> Result<(), PathError> {
    if !path.is_absolute() {
        return Err(PathError::Relative {
            key,
            path: path.to_owned(),
        });
    }
    let ok = path.to_str().is_some_and(|s| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+@".contains(c))
    });
    if ok {
        Ok(())
    } else {
        Err(PathError::Characters {
            key,
            path: path.to_owned(),
        })
    }
}

/// Checks both server paths of `bento.toml`.
pub fn check_server_paths(server: &ServerConfig) -> Result<(), PathError> {
    check_config_path("chroot", &server.chroot)?;
    check_config_path("authorized_keys_dir", &server.authorized_keys_dir)
}

/// The `AuthorizedKeysFile` pattern: root-owned files outside every chroot.
pub fn authorized_keys_pattern(server: &ServerConfig) -> String {
    format!("{}/%u", server.authorized_keys_dir.display())
}

/// The `(keyword, value)` pairs of the Match block, in output order. `check` compares sshd's
/// effective configuration against the same list.
pub fn match_settings(server: &ServerConfig) -> Vec<(&'static str, String)> {
    let no = || "no".to_owned();
    vec![
        ("AuthorizedKeysFile", authorized_keys_pattern(server)),
        ("AuthenticationMethods", "publickey".to_owned()),
        ("PasswordAuthentication", no()),
        ("KbdInteractiveAuthentication", no()),
        // The account's home is <chroot>/<host>: the jail is named by host, not by account.
        ("ChrootDirectory", "%h".to_owned()),
        ("ForceCommand", FORCE_COMMAND.to_owned()),
        ("MaxSessions", MAX_SESSIONS.to_string()),
        ("AllowTcpForwarding", no()),
        ("AllowStreamLocalForwarding", no()),
        ("AllowAgentForwarding", no()),
        ("X11Forwarding", no()),
        ("PermitTunnel", no()),
        ("PermitOpen", "none".to_owned()),
        ("PermitListen", "none".to_owned()),
        ("PermitTTY", no()),
        ("PermitUserRC", no()),
        // Everything else that could let another key or a certificate in, or open a
        // channel, reset here: a global setting for the machine's admins must not apply to
        // the hosts' accounts. Every keyword above is allowed in a Match block
        // (sshd_config(5), "Match").
        ("AuthorizedKeysCommand", "none".to_owned()),
        ("AuthorizedPrincipalsCommand", "none".to_owned()),
        ("AuthorizedPrincipalsFile", "none".to_owned()),
        ("TrustedUserCAKeys", "none".to_owned()),
        ("DisableForwarding", "yes".to_owned()),
    ]
}

/// The `Match Group <group>` block (`[server] group`), indented as sshd_config files
/// usually are. Each fleet on one sshd has its own group, so its own block.
pub fn match_block(server: &ServerConfig) -> String {
    let mut out = format!("Match Group {}\n", server.group);
    for (key, value) in match_settings(server) {
        out.push_str(&format!("    {key} {value}\n"));
    }
    out
}

/// What `bento server sshd-config` prints: the global `MaxStartups` and
/// `PerSourceMaxStartups` and the Match block, as a file of its own that sshd_config
/// includes before anything else.
pub fn sshd_config(server: &ServerConfig) -> String {
    format!(
        "# bento: SFTP chroots for the fleet's hosts (from `bento server sshd-config`).\n\
         # Install as /etc/ssh/sshd_config.d/00-bento.conf, included FIRST: Debian's\n\
         # sshd_config starts with `Include /etc/ssh/sshd_config.d/*.conf`; elsewhere put\n\
         # `Include /etc/ssh/sshd_config.d/00-bento.conf` as its first line.\n\
         # sshd uses the first value it reads for each keyword, so for the hosts' accounts\n\
         # this Match block must come before every other Match that could apply to them;\n\
         # in its own file it also ends with the file, so no later line lands inside it.\n\
         # Many hosts poll at once; OpenSSH's default 10:30:100 starts dropping connections\n\
         # at 10 unauthenticated ones.\n\
         MaxStartups {MAX_STARTUPS}\n\
         # No one source address may hold more than this many of those pre-auth slots.\n\
         PerSourceMaxStartups {PER_SOURCE_MAX_STARTUPS}\n\
         # Sessions per connection are capped below (MaxSessions); connections per host\n\
         # account are capped by PAM's process limit (`sync-accounts` writes\n\
         # {}), which needs UsePAM yes.\n\
         {}",
        super::limits_file(&server.group).display(),
        match_block(server)
    )
}

/// Parses `sshd -T` output (`keyword value…` per line, keywords lowercase) into a map.
/// Keywords that repeat (e.g. `hostkey`) keep their values joined by newlines.
pub fn parse_effective(text: &str) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        map.entry(key.to_ascii_lowercase())
            .and_modify(|v| {
                v.push('\n');
                v.push_str(value);
            })
            .or_insert_with(|| value.to_owned());
    }
    map
}

/// Expands the `%` tokens sshd allows in `ChrootDirectory` and `AuthorizedKeysFile`.
pub fn expand_tokens(pattern: &str, account: &str, home: &str) -> String {
    let mut out = String::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('u') => out.push_str(account),
            Some('h') => out.push_str(home),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// What is wrong with sshd's effective settings for one host account (`sshd -T -C user=…`).
pub fn effective_problems(
    server: &ServerConfig,
    effective: &BTreeMap<String, String>,
    account: &str,
    home: &str,
    host_dir: &Path,
) -> Vec<String> {
    let mut problems = Vec::new();
    let get = |k: &str| effective.get(k).map(String::as_str).unwrap_or("");
    let chroot = get("chrootdirectory");
    if chroot.is_empty() || chroot == "none" {
        problems.push(format!(
            "sshd config lacks the bento Match block: no ChrootDirectory for {account} (add the output of `bento server sshd-config`)"
        ));
        return problems;
    }
    let jail = expand_tokens(chroot, account, home);
    if Path::new(&jail) != host_dir {
        problems.push(format!(
            "sshd jails {account} in {jail}, not in {}",
            host_dir.display()
        ));
    }
    let force = get("forcecommand");
    let words: Vec<&str> = force.split_whitespace().collect();
    let denied: Vec<&str> = words
        .iter()
        .position(|w| *w == "-P")
        .and_then(|i| words.get(i + 1))
        .map(|list| list.split(',').collect())
        .unwrap_or_default();
    if words.first() != Some(&"internal-sftp") {
        problems.push(format!(
            "sshd ForceCommand for {account} is {force:?}, not internal-sftp"
        ));
    } else if !(denied.contains(&"symlink") && denied.contains(&"hardlink")) {
        problems.push(format!(
            "sshd ForceCommand for {account} does not deny link creation (needs -P symlink,hardlink)"
        ));
    }
    let wanted_keys = expand_tokens(&authorized_keys_pattern(server), account, home);
    let keys_files: Vec<String> = get("authorizedkeysfile")
        .split_whitespace()
        .map(|p| expand_tokens(p, account, home))
        .collect();
    if keys_files != [wanted_keys.clone()] {
        problems.push(format!(
            "sshd AuthorizedKeysFile for {account} is {:?}, not {wanted_keys:?}",
            keys_files.join(" ")
        ));
    }
    for key in [
        "authorizedkeyscommand",
        "authorizedprincipalscommand",
        "authorizedprincipalsfile",
        "trustedusercakeys",
    ] {
        let value = get(key);
        if !value.is_empty() && value != "none" {
            problems.push(format!(
                "sshd {key} is {value:?} for {account}, not \"none\" (another key or a certificate could log in)"
            ));
        }
    }
    for key in [
        "allowtcpforwarding",
        "allowstreamlocalforwarding",
        "allowagentforwarding",
        "x11forwarding",
        "permittunnel",
        "permittty",
    ] {
        let value = get(key);
        if value != "no" {
            problems.push(format!("sshd {key} is {value:?} for {account}, not \"no\""));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ServerConfig {
        ServerConfig::default()
    }

    #[test]
    fn sshd_config_snapshot() {
        insta::assert_snapshot!(sshd_config(&server()));
    }

    #[test]
    fn the_block_and_the_limits_file_follow_the_fleets_group() {
        let mut s = server();
        s.group = "fleet_b".to_owned();
        let text = sshd_config(&s);
        assert!(text.contains("\nMatch Group fleet_b\n"), "{text}");
        assert!(!text.contains("Match Group bento"), "{text}");
        assert!(
            text.contains("/etc/security/limits.d/fleet_b.conf"),
            "{text}"
        );
    }

    #[test]
    fn paths_are_checked() {
        let mut s = server();
        assert_eq!(check_server_paths(&s), Ok(()));
        s.authorized_keys_dir = PathBuf::from("/etc/my keys");
        let e = check_server_paths(&s).unwrap_err();
        assert!(e.to_string().contains("authorized_keys_dir"), "{e}");
        s.authorized_keys_dir = PathBuf::from("keys");
        assert!(matches!(
            check_server_paths(&s),
            Err(PathError::Relative { .. })
        ));
        s.authorized_keys_dir = PathBuf::from("/etc/%u");
        assert!(check_server_paths(&s).is_err());
    }

    #[test]
    fn tokens() {
        assert_eq!(expand_tokens("%h", "a", "/srv/x"), "/srv/x");
        assert_eq!(expand_tokens("/k/%u%%", "a", "/h"), "/k/a%");
    }

    #[test]
    fn effective_settings_are_judged() {
        let s = server();
        let good =
            "chrootdirectory %h\nforcecommand internal-sftp -d / -u 0027 -P symlink,hardlink\n\
                    authorizedkeysfile /etc/bento/authorized_keys/%u\nallowtcpforwarding no\n\
                    allowstreamlocalforwarding no\nallowagentforwarding no\nx11forwarding no\n\
                    permittunnel no\npermittty no\n";
        let home = "/srv/bento/web";
        let p = effective_problems(
            &s,
            &parse_effective(good),
            "bento-web",
            home,
            Path::new(home),
        );
        assert!(p.is_empty(), "{p:?}");
        let missing = "chrootdirectory none\nforcecommand none\n";
        let p = effective_problems(
            &s,
            &parse_effective(missing),
            "bento-web",
            home,
            Path::new(home),
        );
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("lacks the bento Match block"), "{p:?}");
        let weak = good
            .replace(" -P symlink,hardlink", "")
            .replace("x11forwarding no", "x11forwarding yes");
        let p = effective_problems(
            &s,
            &parse_effective(&weak),
            "bento-web",
            home,
            Path::new(home),
        );
        assert_eq!(p.len(), 2, "{p:?}");
    }
}
