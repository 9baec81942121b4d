//! Running the system's account tools (`useradd`, `usermod`, `getent`, `sshd -T` …) as argv
//! vectors, turning failures into errors that name the command and keep its stderr.

use std::ffi::OsStr;
use std::time::Duration;

use crate::sys::process::{Cmd, ProcessError};

/// The account tools are quick; one that hangs (a stuck NSS source) must not hang bento.
const TIMEOUT: Duration = Duration::from_secs(120);

/// A failed account command: the argv, how it ended and the tail of its stderr.
pub type CommandError = ProcessError;

/// Runs a command to completion; stdout on success.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String, CommandError> {
    let cmd = Cmd::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .timeout(TIMEOUT)
        .tail_lines(5);
    // The shadow tools refuse to wait for each other's lock on /etc/passwd; several bento
    // runs (or a package install) at once are normal, so back off and retry a little.
    let mut attempt = 0u32;
    loop {
        match cmd.run() {
            Ok(out) => return Ok(out.stdout_text()),
            Err(e)
                if e.exit_code().is_some()
                    && (e.stderr.contains("cannot lock")
                        || e.stderr.contains("try again later"))
                    && attempt < 30 =>
            {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(50 * u64::from(attempt.min(6))));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Like `run`, but a lookup that finds nothing (`getent` exit status 2) is `None`.
pub fn getent(database: &str, key: Option<&str>) -> Result<Option<String>, CommandError> {
    let mut args = vec![database];
    args.extend(key);
    match run("getent", &args) {
        Ok(out) => Ok(Some(out)),
        Err(e) if e.exit_code() == Some(2) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The second field of the account's shadow entry (`*`, `!…` = locked, or a hash).
pub fn shadow_password(account: &str) -> Result<Option<String>, CommandError> {
    Ok(getent("shadow", Some(account))?.and_then(|line| line.split(':').nth(1).map(str::to_owned)))
}

/// All groups of an account, primary and supplementary, by name.
pub fn groups_of(account: &str) -> Result<Vec<String>, CommandError> {
    Ok(run("id", &["-nG", account])?
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// Every account name the system knows (through NSS, as sshd sees them).
pub fn account_names() -> Result<Vec<String>, CommandError> {
    Ok(getent("passwd", None)?
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').next())
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect())
}

/// A `nologin` shell that exists here.
pub fn nologin() -> &'static str {
    ["/usr/sbin/nologin", "/sbin/nologin", "/bin/false"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("/usr/sbin/nologin")
}
