//! Looking up Unix accounts and groups through the C library (so NSS sources such as LDAP
//! count, exactly as sshd sees them; [`Directory`] reads `/etc/passwd` itself only where
//! NSS reads it first, so it answers as they would), and whether we run as root. The `nix` crate (as
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

/// The accounts of one run that looks up many (a publish prepares each changed host's
/// directory as its account's): where NSS reads `/etc/passwd` first (`passwd: files …` in
/// `/etc/nsswitch.conf`), the file is read once and a name found there is answered from
/// it, as NSS would answer it; any other name is asked of NSS. A lookup per host made the
/// C library read the whole file each time: quadratic in the fleet's size.
#[derive(Debug, Default)]
pub struct Directory {
    files: Option<std::collections::HashMap<String, Account>>,
}

impl Directory {
    /// The system's, as its files are now.
    pub fn load() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        Self::from_texts(
            read("/etc/nsswitch.conf").as_deref(),
            read("/etc/passwd").as_deref(),
        )
    }

    /// From the texts of `nsswitch.conf` and `passwd`; without either, every name is asked
    /// of NSS.
    pub fn from_texts(nsswitch: Option<&str>, passwd: Option<&str>) -> Self {
        let files_first = nsswitch.is_some_and(|t| {
            t.lines()
                .map(|l| l.split('#').next().unwrap_or_default().trim())
                .find_map(|l| l.strip_prefix("passwd:"))
                .and_then(|sources| sources.split_whitespace().next())
                == Some("files")
        });
        let files = passwd.filter(|_| files_first).map(|text| {
            let mut all = std::collections::HashMap::new();
            for line in text.lines() {
                let f: Vec<&str> = line.split(':').collect();
                let [name, _, uid, gid, gecos, home, shell] = f[..] else {
                    continue;
                };
                // `+`/`-` lines mean something only to `compat`: NSS is asked for those.
                if name.is_empty() || name.starts_with(['+', '-', '#']) {
                    continue;
                }
                let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse()) else {
                    continue;
                };
                // The first line of a name is the one NSS finds.
                all.entry(name.to_owned()).or_insert_with(|| Account {
                    name: name.to_owned(),
                    uid,
                    gid,
                    home: home.to_owned(),
                    shell: shell.to_owned(),
                    gecos: gecos.to_owned(),
                });
            }
            all
        });
        Self { files }
    }

    /// The account called `name`, or `None` if there is none.
    pub fn user(&self, name: &str) -> io::Result<Option<Account>> {
        match self.files.as_ref().and_then(|f| f.get(name)) {
            Some(found) => Ok(Some(found.clone())),
            None => user(name),
        }
    }
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
    #[test]
    fn a_directory_answers_from_passwd_only_where_nss_reads_it_first() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      b-h1:x:20001:20001:bento host h1:/srv/h1:/usr/sbin/nologin\n\
                      b-h1:x:1:1::/other:/bin/sh\n\
                      broken:x:notanumber:1::/:/bin/sh\n\
                      +nis::::::\n";
        let files = super::Directory::from_texts(
            Some("# comment\npasswd:         files systemd\ngroup: files\n"),
            Some(passwd),
        );
        let h1 = files.user("b-h1").unwrap().unwrap();
        // The first line of a name, as NSS finds it.
        assert_eq!(
            (h1.uid, h1.gid, h1.home.as_str()),
            (20001, 20001, "/srv/h1")
        );
        assert_eq!(h1.gecos, "bento host h1");
        let map = files.files.as_ref().unwrap();
        assert!(!map.contains_key("broken") && !map.contains_key("+nis"));
        // Elsewhere NSS decides: LDAP first, or no nsswitch.conf.
        for nsswitch in [Some("passwd: ldap files\n"), None] {
            assert!(super::Directory::from_texts(nsswitch, Some(passwd))
                .files
                .is_none());
        }
        // A name the file lacks is asked of NSS (this system's root is there either way).
        let nss = super::Directory::from_texts(Some("passwd: files\n"), Some(""));
        assert_eq!(nss.user("root").unwrap().map(|a| a.uid), Some(0));
        assert_eq!(nss.user("no-such-account-bento").unwrap(), None);
    }

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
