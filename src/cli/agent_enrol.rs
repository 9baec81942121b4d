//! `bento agent init` and `bento agent check`: the first commands on a new machine. `init`
//! makes the machine's key and prints the line for the server's admin; `check` says, one
//! line each, what stands between this machine and its first update.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::agent::preflight::{self, Level};
use crate::sys::{output, terminal};

/// The machine's name: `--host`, else its host name.
fn machine_name(host: Option<String>) -> anyhow::Result<String> {
    if let Some(h) = host {
        return Ok(h);
    }
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading this machine's host name (pass --host NAME)")?;
    let name = name.trim();
    // A fully qualified name: the fleet knows the machine by its first label.
    Ok(name.split('.').next().unwrap_or(name).to_owned())
}

pub fn init(server: &str, host: Option<String>, identity_file: &Path) -> anyhow::Result<ExitCode> {
    let name = machine_name(host)?;
    let host = crate::protocol::HostName::new(&name)
        .with_context(|| format!("host name {name:?} (pass --host NAME)"))?;
    let (line, made) = crate::agent::identity::ensure(identity_file, &format!("root@{host}"))
        .context("the machine's SSH key")?;
    if made {
        output::note(&format!(
            "made this machine's key {} (and {}.pub)",
            identity_file.display(),
            identity_file.display()
        ));
    } else {
        output::note(&format!(
            "this machine's key is {}",
            identity_file.display()
        ));
    }
    output::note(&format!(
        "give the admin of {server} this line to run on the server; they send back the output of `bento agent-config {host}`, which goes to /etc/bento/agent.toml (and known_hosts); then `bento agent check`:"
    ));
    // Single quotes for the shell: a key line holds none.
    output::line(&format!("bento host add {host} --key '{}'", line.trim()));
    Ok(ExitCode::SUCCESS)
}

pub fn check(config: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let findings = preflight::check(config);
    let failed = findings.iter().any(|f| f.level == Level::Fail);
    if json {
        output::json(&findings)?;
    } else {
        for f in &findings {
            let word = match f.level {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            output::line(&format!(
                "{word}  {:13} {}",
                f.check,
                terminal::escape(&f.message)
            ));
        }
    }
    Ok(if failed {
        ExitCode::from(super::EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}
