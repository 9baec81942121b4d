//! Looking up Unix accounts and groups through the C library (so NSS sources such as LDAP
//! count, exactly as sshd sees them), and whether we run as root.

use std::ffi::{CStr, CString};
use std::io;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The account called `name`, or `None` if there is none.
pub fn user(name: &str) -> io::Result<Option<Account>> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: passwd is plain data; getpwnam_r fills it with pointers into buf, which
        // outlives every use below.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Ok(None);
        }
        // SAFETY: on success the string fields point at NUL-terminated strings in buf.
        let text =
            |p: *const libc::c_char| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        return Ok(Some(Account {
            name: text(pwd.pw_name),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home: text(pwd.pw_dir),
            shell: text(pwd.pw_shell),
        }));
    }
}

/// The gid of group `name`, or `None` if there is none.
pub fn group(name: &str) -> io::Result<Option<u32>> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: as in `user`.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        return Ok(if result.is_null() {
            None
        } else {
            Some(grp.gr_gid)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_and_nonsense_does_not() {
        let root = user("root").unwrap().expect("root account");
        assert_eq!(root.uid, 0);
        assert_eq!(group("root").unwrap(), Some(0));
        assert_eq!(user("no-such-bento-account").unwrap(), None);
        assert_eq!(group("no-such-bento-group").unwrap(), None);
        assert_eq!(user("bad\0name").unwrap(), None);
    }
}
