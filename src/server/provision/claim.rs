//! Which fleet a chroot root and its host directories belong to, for `sync-accounts`: the
//! root carries a mark naming the fleet (its `account_prefix`, which names every account
//! it makes), and a host directory already given to another account is never taken over.
//! Invariant: `sync-accounts` of one fleet never changes the owner of another fleet's jail,
//! and every owner or mode it changes on a jail is reported.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::protocol::layout::{Chroot, LOGS, MANIFESTS, OBJECTS};
use crate::sys::{accounts, atomic};

/// The mark's file name in `<chroot>/.bento/` (root-only, like the rest of it).
pub const FLEET_MARK: &str = "fleet";

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("chroot {root} belongs to the fleet whose account_prefix is {theirs:?} (marked in {mark}), not this fleet's {ours:?}: give each fleet its own [server] chroot; refusing to touch its host directories")]
    OtherFleet {
        root: PathBuf,
        mark: PathBuf,
        theirs: String,
        ours: String,
    },
    #[error("{dir} is the jail of account {owner} (its group), not of {account}: another fleet sharing this chroot? refusing to take it over; give each fleet its own [server] chroot")]
    OtherAccount {
        dir: PathBuf,
        owner: String,
        account: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ClaimError + '_ {
    move |source| ClaimError::Io {
        path: path.to_owned(),
        source,
    }
}

fn mark_text(prefix: &str) -> String {
    format!("account_prefix = {prefix:?}\n")
}

/// The `account_prefix` a chroot's mark names, if it has one.
pub fn marked_prefix(chroot: &Chroot) -> Result<Option<String>, ClaimError> {
    let mark = chroot.state_dir().join(FLEET_MARK);
    let text = match fs::read_to_string(&mark) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&mark)(e)),
    };
    let value = text
        .trim()
        .strip_prefix("account_prefix = ")
        .and_then(|v| serde_json::from_str::<String>(v).ok());
    // An unreadable mark is someone else's: never overwritten silently.
    Ok(Some(value.unwrap_or_else(|| text.trim().to_owned())))
}

/// Refuses a chroot marked by another fleet. Checked before anything changes.
pub fn check(chroot: &Chroot, prefix: &str) -> Result<(), ClaimError> {
    match marked_prefix(chroot)? {
        Some(theirs) if theirs != prefix => Err(ClaimError::OtherFleet {
            root: chroot.root.clone(),
            mark: chroot.state_dir().join(FLEET_MARK),
            theirs,
            ours: prefix.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// Marks the chroot root as this fleet's (once); returns the change to report, if any.
pub fn mark(chroot: &Chroot, prefix: &str) -> Result<Option<String>, ClaimError> {
    check(chroot, prefix)?;
    let dir = chroot.state_dir();
    let path = dir.join(FLEET_MARK);
    if path.exists() {
        return Ok(None);
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io_err(&dir))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
    atomic::write_file(&path, mark_text(prefix).as_bytes(), 0o644).map_err(io_err(&path))?;
    Ok(Some(format!(
        "marked {} as the chroot of the fleet with account_prefix {prefix:?}",
        chroot.root.display()
    )))
}

/// Refuses a host directory that is already another existing account's jail (its group is
/// another account's group). A directory of root's group (new, or sealed by a prune) or of
/// a group that no longer exists is free to take.
pub fn check_jail(dir: &Path, account: &str, account_gid: Option<u32>) -> Result<(), ClaimError> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    if meta.gid() == 0 || Some(meta.gid()) == account_gid {
        return Ok(());
    }
    match accounts::group_name(meta.gid()).map_err(io_err(Path::new("/etc/group")))? {
        Some(owner) => Err(ClaimError::OtherAccount {
            dir: dir.to_owned(),
            owner,
            account: account.to_owned(),
        }),
        None => Ok(()),
    }
}

/// A directory of a jail with its owner, group and mode (`None`: not there).
pub type JailOwner = (PathBuf, Option<(u32, u32, u32)>);

/// Owner, group and mode of a host directory and its subdirectories, to report what a sync
/// changed.
pub fn ownership(host_dir: &Path) -> Vec<JailOwner> {
    [
        host_dir.to_owned(),
        host_dir.join(MANIFESTS),
        host_dir.join(OBJECTS),
        host_dir.join(LOGS),
    ]
    .into_iter()
    .map(|p| {
        let m = fs::symlink_metadata(&p)
            .ok()
            .map(|m| (m.uid(), m.gid(), m.mode() & 0o7777));
        (p, m)
    })
    .collect()
}

/// What changed between two `ownership` readings, one line per directory (a directory
/// that did not exist before is not a change of owner: creating it is reported elsewhere).
pub fn changes(before: &[JailOwner], after: &[JailOwner]) -> Vec<String> {
    before
        .iter()
        .zip(after)
        .filter_map(|((path, b), (_, a))| match (b, a) {
            (Some((bu, bg, bm)), Some((au, ag, am))) if (bu, bg, bm) != (au, ag, am) => {
                Some(format!(
                    "{}: owner {bu}:{bg} mode {bm:04o} -> {au}:{ag} {am:04o}",
                    path.display()
                ))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chroot_is_marked_once_and_another_fleets_mark_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let chroot = Chroot::new(tmp.path().join("chroot"));
        fs::create_dir_all(&chroot.root).unwrap();
        assert_eq!(marked_prefix(&chroot).unwrap(), None);
        assert!(mark(&chroot, "bento-").unwrap().is_some());
        assert_eq!(mark(&chroot, "bento-").unwrap(), None, "said once");
        assert_eq!(marked_prefix(&chroot).unwrap().as_deref(), Some("bento-"));
        let err = mark(&chroot, "other-").unwrap_err().to_string();
        assert!(
            err.contains("\"bento-\"") && err.contains("own [server] chroot"),
            "{err}"
        );
        assert!(check(&chroot, "bento-").is_ok());
    }

    #[test]
    fn ownership_changes_are_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("h");
        fs::create_dir_all(dir.join(LOGS)).unwrap();
        let before = ownership(&dir);
        fs::set_permissions(dir.join(LOGS), fs::Permissions::from_mode(0o700)).unwrap();
        let after = ownership(&dir);
        let c = changes(&before, &after);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].contains("logs") && c[0].ends_with("0700"), "{c:?}");
        assert!(changes(&after, &ownership(&dir)).is_empty());
    }
}
