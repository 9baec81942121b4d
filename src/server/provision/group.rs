//! Who else is in the fleet's group (`[server] group`): sshd's `Match Group` block jails
//! every member of it, so the group must hold this fleet's host accounts and nothing else.
//! Invariant: `sync-accounts` (and `host add` as root) changes nothing while the group holds
//! a host account of another fleet (jailed in another chroot, or in a chroot marked as
//! another fleet's) or an account that is not a bento host account; `server check` names
//! the same accounts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::protocol::layout::Chroot;
use crate::server::fleet::{check_group, FleetConfig};
use crate::sys::accounts::{self, Account};

use super::claim;
use super::system::{self, CommandError};

/// The comment (GECOS field) of every account sync-accounts makes: together with its home,
/// the host's directory in this fleet's chroot, it marks the account as this fleet's, and
/// nothing else is ever changed or deleted.
pub const ACCOUNT_COMMENT: &str = "bento host account";

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("cannot list the members of group {group}: {source}")]
    Lookup {
        group: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{}", .0.join("\n"))]
    Strangers(Vec<String>),
}

/// A member of the group that is not one of this fleet's host accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stranger {
    /// A bento host account of another fleet: jailed in `chroot`, which is not this fleet's
    /// or is marked as the fleet whose `account_prefix` is `marked`.
    OtherFleet {
        account: String,
        home: String,
        chroot: PathBuf,
        marked: Option<String>,
    },
    /// An account that is no bento host account (an operator's, a service's).
    NotHost { account: String, comment: String },
}

/// Whether `account` is a bento host account: made by bento (its comment), or made before
/// bento wrote one (no comment, no login shell).
pub fn is_host_account(account: &Account, nologin: &str) -> bool {
    account.gecos == ACCOUNT_COMMENT || (account.gecos.is_empty() && account.shell == nologin)
}

/// Judges one member of the group: `None` when it is a host account jailed in this fleet's
/// chroot, which no other fleet's mark claims. `mark_of` reads a chroot's fleet mark.
pub fn judge(
    member: &Account,
    nologin: &str,
    ours: &Chroot,
    prefix: &str,
    mark_of: &dyn Fn(&Path) -> Option<String>,
) -> Option<Stranger> {
    if !is_host_account(member, nologin) {
        return Some(Stranger::NotHost {
            account: member.name.clone(),
            comment: member.gecos.clone(),
        });
    }
    let chroot = Path::new(&member.home)
        .parent()
        .unwrap_or(Path::new("/"))
        .to_owned();
    let marked = mark_of(&chroot);
    let other_mark = marked.as_deref().is_some_and(|m| m != prefix);
    (chroot != ours.root || other_mark).then(|| Stranger::OtherFleet {
        account: member.name.clone(),
        home: member.home.clone(),
        chroot,
        marked,
    })
}

/// A group name for a second fleet, from its account prefix (`lab-` gives `lab`).
pub fn suggested_group(prefix: &str, taken: &str) -> String {
    let base = prefix.trim_end_matches(['-', '_']);
    if base != taken && check_group(base).is_ok() {
        return base.to_owned();
    }
    let numbered = format!("{taken}2");
    if check_group(&numbered).is_ok() {
        numbered
    } else {
        "bento2".to_owned()
    }
}

/// One line per stranger: who, why, and the fix.
pub fn describe(group: &str, prefix: &str, stranger: &Stranger) -> String {
    match stranger {
        Stranger::OtherFleet {
            account,
            home,
            chroot,
            marked,
        } => {
            let mark = marked
                .as_deref()
                .map(|m| format!(", marked as the fleet with account_prefix {m:?}"))
                .unwrap_or_default();
            format!(
                "group {group} already holds account {account} of another fleet (jailed in {home}, chroot {}{mark}); one sshd `Match Group {group}` block serves one fleet: give this fleet a group of its own (`[server] group = \"{}\"` in bento.toml) and install its `Match Group` block from `bento server sshd-config` beside the other fleet's, one block each",
                chroot.display(),
                suggested_group(prefix, group)
            )
        }
        Stranger::NotHost { account, comment } => format!(
            "group {group} holds account {account}, which is not a bento host account (comment {comment:?}): sshd's `Match Group {group}` block would jail it too; take it out of the group, or give this fleet a group of its own (`[server] group = \"{}\"` in bento.toml)",
            suggested_group(prefix, group)
        ),
    }
}

/// One `getent passwd` line as an account.
fn passwd_line(line: &str) -> Option<Account> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 || f[0].is_empty() {
        return None;
    }
    Some(Account {
        name: f[0].to_owned(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        gecos: f[4].to_owned(),
        home: f[5].to_owned(),
        shell: f[6].to_owned(),
    })
}

/// Every account in `group`, as its primary group or listed in it (none: no such group).
pub fn members(group: &str) -> Result<Vec<Account>, GroupError> {
    let lookup = |source| GroupError::Lookup {
        group: group.to_owned(),
        source,
    };
    let Some((gid, listed)) = accounts::group_members(group).map_err(lookup)? else {
        return Ok(Vec::new());
    };
    let all: BTreeMap<String, Account> = system::getent("passwd", None)?
        .unwrap_or_default()
        .lines()
        .filter_map(passwd_line)
        .map(|a| (a.name.clone(), a))
        .collect();
    let mut out: BTreeMap<String, Account> = all
        .values()
        .filter(|a| a.gid == gid)
        .map(|a| (a.name.clone(), a.clone()))
        .collect();
    for name in listed {
        let account = match all.get(&name) {
            Some(a) => Some(a.clone()),
            None => accounts::user(&name).map_err(lookup)?,
        };
        if let Some(a) = account {
            out.insert(name, a);
        }
    }
    Ok(out.into_values().collect())
}

/// What is wrong with the fleet's group, one line each (empty: only this fleet's accounts).
pub fn problems(config: &FleetConfig) -> Result<Vec<String>, GroupError> {
    let server = &config.server;
    let ours = Chroot::new(&server.chroot);
    let mark_of = |chroot: &Path| claim::marked_prefix(&Chroot::new(chroot)).ok().flatten();
    let nologin = system::nologin();
    Ok(members(&server.group)?
        .iter()
        .filter_map(|m| judge(m, nologin, &ours, &server.account_prefix, &mark_of))
        .map(|s| describe(&server.group, &server.account_prefix, &s))
        .collect())
}

/// Refuses a group that holds anything but this fleet's host accounts.
pub fn refuse_strangers(config: &FleetConfig) -> Result<(), GroupError> {
    let found = problems(config)?;
    if found.is_empty() {
        Ok(())
    } else {
        Err(GroupError::Strangers(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOLOGIN: &str = "/usr/sbin/nologin";

    fn account(name: &str, home: &str, gecos: &str) -> Account {
        Account {
            name: name.to_owned(),
            uid: 990,
            gid: 990,
            home: home.to_owned(),
            shell: NOLOGIN.to_owned(),
            gecos: gecos.to_owned(),
        }
    }

    fn marks(marked: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let marked: Vec<(PathBuf, String)> = marked
            .iter()
            .map(|(p, m)| (PathBuf::from(p), m.to_string()))
            .collect();
        move |p: &Path| marked.iter().find(|(q, _)| q == p).map(|(_, m)| m.clone())
    }

    #[test]
    fn this_fleets_accounts_pass_and_another_fleets_are_named() {
        let ours = Chroot::new("/srv/a");
        let mark_of = marks(&[("/srv/a", "a-"), ("/srv/b", "b-")]);
        let mine = account("a-web", "/srv/a/web", ACCOUNT_COMMENT);
        assert_eq!(judge(&mine, NOLOGIN, &ours, "a-", &mark_of), None);
        // Made before bento wrote its comment: still this fleet's.
        let legacy = account("a-db", "/srv/a/db", "");
        assert_eq!(judge(&legacy, NOLOGIN, &ours, "a-", &mark_of), None);

        let theirs = account("b-web", "/srv/b/web", ACCOUNT_COMMENT);
        let found = judge(&theirs, NOLOGIN, &ours, "a-", &mark_of).unwrap();
        assert_eq!(
            found,
            Stranger::OtherFleet {
                account: "b-web".to_owned(),
                home: "/srv/b/web".to_owned(),
                chroot: PathBuf::from("/srv/b"),
                marked: Some("b-".to_owned()),
            }
        );
        let line = describe("bento", "a-", &found);
        for part in [
            "account b-web of another fleet",
            "chroot /srv/b",
            "account_prefix \"b-\"",
            "[server] group = \"a\"",
            "one block each",
        ] {
            assert!(line.contains(part), "{part}: {line}");
        }
        // In this chroot, but the chroot is marked as another fleet's.
        let claimed = judge(&mine, NOLOGIN, &ours, "c-", &mark_of);
        assert!(
            matches!(claimed, Some(Stranger::OtherFleet { ref chroot, .. }) if chroot == &ours.root),
            "{claimed:?}"
        );
    }

    #[test]
    fn an_account_that_is_no_host_account_is_named() {
        let ours = Chroot::new("/srv/a");
        let mut admin = account("alice", "/home/alice", "Alice");
        admin.shell = "/bin/bash".to_owned();
        let found = judge(&admin, NOLOGIN, &ours, "a-", &|_: &Path| None).unwrap();
        let line = describe("users", "a-", &found);
        assert!(
            line.contains("account alice, which is not a bento host account")
                && line.contains("would jail it"),
            "{line}"
        );
    }

    #[test]
    fn suggestions_are_valid_groups_other_than_the_taken_one() {
        assert_eq!(suggested_group("lab-", "bento"), "lab");
        assert_eq!(suggested_group("bento-", "bento"), "bento2");
        assert_eq!(suggested_group("9x-", "bento"), "bento2");
    }

    #[test]
    fn passwd_lines() {
        let a =
            passwd_line("bento-web:x:998:997:bento host account:/srv/bento/web:/usr/sbin/nologin")
                .unwrap();
        assert_eq!(
            (a.name.as_str(), a.uid, a.gid, a.home.as_str()),
            ("bento-web", 998, 997, "/srv/bento/web")
        );
        assert_eq!(a.gecos, ACCOUNT_COMMENT);
        assert_eq!(passwd_line("broken:x:1"), None);
    }
}
