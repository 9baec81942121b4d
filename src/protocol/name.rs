//! Host and account names. A `HostName` is valid once built, so it is safe to use as a
//! path component and, with the account prefix, as a Unix account name.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Longest Unix account name accepted. `useradd` allows 32, but NixOS aborts evaluation on
/// user and group names of 32 characters or more (`users-groups.nix`: `stringLength x < 32`),
/// so a fleet valid here must stay valid when its server runs NixOS.
pub const MAX_ACCOUNT_LEN: usize = 31;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("invalid host name {0:?}: use lowercase letters, digits and '-', starting with a letter or digit, at most 63 characters (and at most {MAX_ACCOUNT_LEN} together with the account prefix)")]
    Host(String),
    #[error("invalid account prefix {0:?}: use lowercase letters, digits, '-' and '_', starting with a letter or '_'")]
    Prefix(String),
    #[error("invalid group {0:?} ([server] group): use lowercase letters, digits, '-' and '_', starting with a letter or '_', at most {MAX_ACCOUNT_LEN} characters (NixOS refuses group names of 32 or more)")]
    Group(String),
    #[error("host {host:?}: its account name {account:?} (account_prefix + host name) is {len} characters long, but account names may have at most {MAX_ACCOUNT_LEN} (NixOS refuses user and group names of 32 or more): shorten the host name or account_prefix")]
    AccountTooLong {
        host: String,
        account: String,
        len: usize,
    },
}

/// A host name: `[a-z0-9][a-z0-9-]*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct HostName(String);

impl HostName {
    pub fn new(s: &str) -> Result<Self, NameError> {
        let mut chars = s.chars();
        let ok = matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && s.len() <= 63;
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::Host(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for HostName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HostName::new(&s).map_err(serde::de::Error::custom)
    }
}

/// Checks an account prefix such as `bento-`: it must start a valid Unix account name.
pub fn check_prefix(prefix: &str) -> Result<(), NameError> {
    let mut chars = prefix.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(NameError::Prefix(prefix.to_owned()))
    }
}

/// Checks the group every host account of a fleet is in (`[server] group`): a Unix group
/// name NixOS accepts too.
pub fn check_group(group: &str) -> Result<(), NameError> {
    let mut chars = group.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && group.len() <= MAX_ACCOUNT_LEN;
    if ok {
        Ok(())
    } else {
        Err(NameError::Group(group.to_owned()))
    }
}

/// The Unix account a host logs in as: prefix + host name, at most `MAX_ACCOUNT_LEN` characters.
pub fn account_name(prefix: &str, host: &HostName) -> Result<String, NameError> {
    check_prefix(prefix)?;
    let account = format!("{prefix}{host}");
    if account.len() > MAX_ACCOUNT_LEN {
        return Err(NameError::AccountTooLong {
            host: host.to_string(),
            len: account.len(),
            account,
        });
    }
    Ok(account)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        for ok in ["a", "alpha", "web-01", "0day", "a-"] {
            assert!(HostName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "Alpha", "a_b", "a.b", "a/b", "..", "é", "a b"] {
            assert_eq!(
                HostName::new(bad),
                Err(NameError::Host(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn groups() {
        for ok in ["bento", "_b", "bt-ab_c9", &"g".repeat(31)] {
            assert_eq!(check_group(ok), Ok(()), "{ok}");
        }
        for bad in ["", "9b", "-b", "Bento", "b.c", "b c", "b$", &"g".repeat(32)] {
            assert_eq!(
                check_group(bad),
                Err(NameError::Group(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn accounts() {
        let h = HostName::new("web").unwrap();
        assert_eq!(account_name("bento-", &h).unwrap(), "bento-web");
        assert!(matches!(account_name("-x", &h), Err(NameError::Prefix(_))));
        // NixOS's limit: 31 characters is the longest account, 32 is refused.
        let longest = HostName::new(&"a".repeat(25)).unwrap();
        assert_eq!(account_name("bento-", &longest).unwrap().len(), 31);
        let long = HostName::new(&"a".repeat(26)).unwrap();
        let err = account_name("bento-", &long).unwrap_err().to_string();
        assert!(err.contains(&format!("host \"{long}\"")), "{err}");
        assert!(err.contains("32 characters long"), "{err}");
        assert!(err.contains("at most 31"), "{err}");
    }
}
