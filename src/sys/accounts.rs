//! Looking up Unix accounts and groups through the C library (so NSS sources such as LDAP
//! count, exactly as sshd sees them), and whether we run as root. The `nix` crate (as
//! `unix`) wraps getpwnam_r/getgrnam_r and geteuid, so nothing here is `unsafe`.

use std::io;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
    /// The comment (GECOS) field.
    pub gecos: String,
}

pub fn is_root() -> bool {
    euid() == 0
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    unix::unistd::geteuid().as_raw()
}

/// The effective gid of this process.
pub fn egid() -> u32 {
    unix::unistd::getegid().as_raw()
}

fn nss_error(e: unix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// The account called `name`, or `None` if there is none.
pub fn user(name: &str) -> io::Result<Option<Account>> {
    if name.contains('\0') {
        return Ok(None);
    }
    let found = unix::unistd::User::from_name(name).map_err(nss_error)?;
    Ok(found.map(|u| Account {
        name: u.name,
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        home: u.dir.to_string_lossy().into_owned(),
        shell: u.shell.to_string_lossy().into_owned(),
        gecos: u.gecos.to_string_lossy().into_owned(),
    }))
}

/// The gid of group `name`, or `None` if there is none.
pub fn group(name: &str) -> io::Result<Option<u32>> {
    if name.contains('\0') {
        return Ok(None);
    }
    let found = unix::unistd::Group::from_name(name).map_err(nss_error)?;
    Ok(found.map(|g| g.gid.as_raw()))
}

/// The gid of group `name` and its listed (supplementary) members, or `None` if there is
/// no such group. Accounts whose primary group it is are not listed here.
pub fn group_members(name: &str) -> io::Result<Option<(u32, Vec<String>)>> {
    if name.contains('\0') {
        return Ok(None);
    }
    let found = unix::unistd::Group::from_name(name).map_err(nss_error)?;
    Ok(found.map(|g| (g.gid.as_raw(), g.mem)))
}

/// The name of the group with `gid`, or `None` if there is none.
pub fn group_name(gid: u32) -> io::Result<Option<String>> {
    let found =
        unix::unistd::Group::from_gid(unix::unistd::Gid::from_raw(gid)).map_err(nss_error)?;
    Ok(found.map(|g| g.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_and_nonsense_does_not() {
        let root = user("root").unwrap().expect("root account");
        assert_eq!(root.uid, 0);
        assert_eq!(group("root").unwrap(), Some(0));
        assert_eq!(group_name(0).unwrap().as_deref(), Some("root"));
        assert_eq!(user("no-such-bento-account").unwrap(), None);
        assert_eq!(group("no-such-bento-group").unwrap(), None);
        assert_eq!(user("bad\0name").unwrap(), None);
    }
}
