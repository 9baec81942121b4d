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

type NssCall<T> = unsafe extern "C" fn(
    *const libc::c_char,
    *mut T,
    *mut libc::c_char,
    libc::size_t,
    *mut *mut T,
) -> libc::c_int;

/// Runs a reentrant NSS lookup (`getpwnam_r`, `getgrnam_r`), growing the buffer on ERANGE,
/// and turns the entry found into owned data with `read` while its strings are alive.
fn nss_lookup<T, R>(name: &str, call: NssCall<T>, read: impl Fn(&T) -> R) -> io::Result<Option<R>> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: T is a plain C struct (passwd, group); the call fills it with pointers into
        // buf, which outlives every use of the entry below.
        let mut entry: T = unsafe { std::mem::zeroed() };
        let mut result: *mut T = std::ptr::null_mut();
        let rc = unsafe {
            call(
                cname.as_ptr(),
                &mut entry,
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
        return Ok((!result.is_null()).then(|| read(&entry)));
    }
}

fn text(p: *const libc::c_char) -> String {
    // SAFETY: NSS entries hold NUL-terminated strings (alive while the lookup's buffer is).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The account called `name`, or `None` if there is none.
pub fn user(name: &str) -> io::Result<Option<Account>> {
    nss_lookup(name, libc::getpwnam_r, |pwd: &libc::passwd| Account {
        name: text(pwd.pw_name),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        home: text(pwd.pw_dir),
        shell: text(pwd.pw_shell),
    })
}

/// The gid of group `name`, or `None` if there is none.
pub fn group(name: &str) -> io::Result<Option<u32>> {
    nss_lookup(name, libc::getgrnam_r, |grp: &libc::group| grp.gr_gid)
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
