//! Running the system's account tools (`useradd`, `usermod`, `getent`, `sshd -T` …) as argv
//! vectors, turning failures into errors that name the command and keep its stderr.

use std::ffi::OsStr;
use std::process::Command;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("`{argv}` {status}: {stderr}")]
pub struct CommandError {
    pub argv: String,
    pub status: String,
    pub stderr: String,
}

/// Runs a command to completion; stdout on success.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String, CommandError> {
    let argv = || {
        std::iter::once(program.to_owned())
            .chain(
                args.iter()
                    .map(|a| a.as_ref().to_string_lossy().into_owned()),
            )
            .collect::<Vec<_>>()
            .join(" ")
    };
    // The shadow tools refuse to wait for each other's lock on /etc/passwd; several bento
    // runs (or a package install) at once are normal, so back off and retry a little.
    let mut attempt = 0u32;
    loop {
        let out = Command::new(program)
            .args(args)
            .env("LC_ALL", "C")
            .output()
            .map_err(|e| CommandError {
                argv: argv(),
                status: "could not start".to_owned(),
                stderr: e.to_string(),
            })?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let busy = stderr.contains("cannot lock") || stderr.contains("try again later");
        if busy && attempt < 30 {
            attempt += 1;
            std::thread::sleep(Duration::from_millis(50 * u64::from(attempt.min(6))));
            continue;
        }
        let tail: Vec<&str> = stderr.trim_end().lines().rev().take(5).collect();
        return Err(CommandError {
            argv: argv(),
            status: match out.status.code() {
                Some(c) => format!("exited with status {c}"),
                None => "was killed by a signal".to_owned(),
            },
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
}

/// Like `run`, but a lookup that finds nothing (`getent` exit status 2) is `None`.
pub fn getent(database: &str, key: Option<&str>) -> Result<Option<String>, CommandError> {
    let mut args = vec![database];
    args.extend(key);
    match run("getent", &args) {
        Ok(out) => Ok(Some(out)),
        Err(e) if e.status == "exited with status 2" => Ok(None),
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
