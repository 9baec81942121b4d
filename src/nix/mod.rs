//! Running Nix. Every invocation goes through one runner that turns the child's outcome
//! into a typed result; a failure keeps the argv and the tail of stderr so the message says
//! what was run and why it failed.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::sys::process::{tail, Output};
use crate::sys::process::{Cmd, ProcessError, Stream};

/// Flags that make the `nix` command (not `nix-build`) usable on any Nix ≥ 2.4 without a
/// matching `nix.conf`.
const EXPERIMENTAL: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];
/// How much of a failing command's stderr an error carries.
pub const STDERR_TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    /// The command could not start, exited non-zero, was killed or timed out.
    #[error("{}{}", .0, nix_hint(.0))]
    Command(Box<ProcessError>),
    #[error("`{argv}` printed something unexpected: {message}")]
    Output { argv: String, message: String },
}

fn nix_hint(e: &ProcessError) -> &'static str {
    if e.not_started() {
        " (is Nix installed and on PATH?)"
    } else {
        ""
    }
}

impl NixError {
    /// The full stderr of a failed command, when there is one.
    pub fn log(&self) -> &str {
        match self {
            NixError::Command(e) => &e.stderr,
            NixError::Output { .. } => "",
        }
    }
}

pub use crate::protocol::store_path::{BadStorePath, StorePath};

/// What to build: a host of a flake, or a classic `configuration.nix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `nixosConfigurations.<host>.config.system.build.toplevel` of the flake in `dir`.
    Flake { dir: PathBuf, host: String },
    /// `<nixpkgs/nixos>` with `nixos-config=<dir>/configuration.nix` (nixpkgs from NIX_PATH).
    Classic { dir: PathBuf },
}

const TOPLEVEL: &str = "config.system.build.toplevel";

impl Target {
    fn flake_attr(dir: &Path, host: &str, suffix: &str) -> String {
        format!(
            "path:{}#nixosConfigurations.\"{host}\".{TOPLEVEL}{suffix}",
            dir.display()
        )
    }
}

/// A successful build: the output and everything Nix printed.
#[derive(Debug, Clone)]
pub struct Built {
    pub path: StorePath,
    pub log: String,
}

/// Runs Nix commands.
#[derive(Debug, Clone, Default)]
pub struct Nix {
    /// Extra environment for every Nix child (e.g. NIX_PATH for classic builds).
    env: Vec<(OsString, OsString)>,
    /// A deadline for every Nix child; none by default (builds take as long as they take).
    timeout: Option<Duration>,
    /// Evaluate and build as for an untrusted tree (see [`Nix::restricted`]).
    restricted: bool,
}

/// The search-path name under which a restricted classic evaluation may read its tree (a
/// named entry, so it never shadows `<nixpkgs>`).
const TREE_ENTRY: &str = "bento-host-tree";

impl Nix {
    /// Evaluates and builds what a fleet-repo contributor wrote, on the server: a classic
    /// configuration with `restrict-eval` (it reads only its own tree and the search path,
    /// i.e. the nixpkgs it names: no key file, no `/etc`, no URL), a flake in pure mode as
    /// always, and builds as the `nixbld` build users when bento runs as root and the group
    /// has members, so a builder cannot read root's files either.
    pub fn restricted(mut self) -> Self {
        self.restricted = true;
        self
    }

    /// `--option` pairs a restricted evaluation or build adds for `target`.
    fn restriction(&self, target: &Target) -> Vec<String> {
        if !self.restricted {
            return Vec::new();
        }
        let mut args = Vec::new();
        if let Target::Classic { dir } = target {
            args.extend([
                "--option".to_owned(),
                "restrict-eval".to_owned(),
                "true".to_owned(),
                "-I".to_owned(),
                format!("{TREE_ENTRY}={}", dir.display()),
            ]);
        }
        if crate::sys::accounts::is_root() && build_users_exist() {
            args.extend([
                "--option".to_owned(),
                "build-users-group".to_owned(),
                BUILD_USERS_GROUP.to_owned(),
            ]);
        }
        args
    }

    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Kills any Nix child (and what it started) that runs longer than `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    fn command<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Cmd {
        let mut cmd = Cmd::new(program).tail_lines(STDERR_TAIL_LINES);
        if program == "nix" {
            cmd = cmd.args(EXPERIMENTAL);
        }
        cmd = cmd.args(args);
        for (k, v) in &self.env {
            cmd = cmd.env(k, v);
        }
        if let Some(t) = self.timeout {
            cmd = cmd.timeout(t);
        }
        cmd
    }

    /// Runs `program args…`; `nix` itself gets the experimental-features flags.
    pub fn run<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Result<Output, NixError> {
        self.command(program, args)
            .run()
            .map_err(|e| NixError::Command(Box::new(e)))
    }

    /// Like `run`, with every line of stderr (Nix's progress and build log) handed to
    /// `on_log` as it arrives.
    pub fn run_streamed<S: AsRef<OsStr>>(
        &self,
        program: &str,
        args: &[S],
        mut on_log: impl FnMut(&str),
    ) -> Result<Output, NixError> {
        self.command(program, args)
            .run_streamed(|stream, line| {
                if stream == Stream::Stderr {
                    on_log(line);
                }
            })
            .map_err(|e| NixError::Command(Box::new(e)))
    }

    /// The attribute names of `nixosConfigurations` of the flake in `dir` (read as a
    /// `path:` flake, so untracked files count and no git metadata is needed).
    pub fn flake_nixos_configurations(&self, dir: &Path) -> Result<Vec<String>, NixError> {
        let flake = format!("path:{}#nixosConfigurations", dir.display());
        let args = ["eval", "--json", &flake, "--apply", "builtins.attrNames"];
        let out = self.run("nix", &args)?;
        serde_json::from_slice(&out.stdout).map_err(|e| NixError::Output {
            argv: format!("nix {}", args.join(" ")),
            message: e.to_string(),
        })
    }

    /// Builds a system; no `result` link is left behind.
    pub fn build(&self, target: &Target) -> Result<Built, NixError> {
        let restriction = self.restriction(target);
        match target {
            Target::Flake { dir, host } => {
                let attr = Target::flake_attr(dir, host, "");
                let mut args: Vec<&str> =
                    vec!["build", "--no-link", "--json", "--print-build-logs", &attr];
                args.extend(restriction.iter().map(String::as_str));
                let out = self.run("nix", &args)?;
                let path = parse_build_json(&out.stdout).map_err(|message| NixError::Output {
                    argv: format!("nix {}", args.join(" ")),
                    message,
                })?;
                Ok(Built {
                    path,
                    log: out.stderr,
                })
            }
            Target::Classic { dir } => {
                let config = format!("nixos-config={}", dir.join("configuration.nix").display());
                let mut args: Vec<&str> = vec![
                    "<nixpkgs/nixos>",
                    "-A",
                    TOPLEVEL,
                    "-I",
                    &config,
                    "--no-out-link",
                ];
                args.extend(restriction.iter().map(String::as_str));
                let out = self.run("nix-build", &args)?;
                let text = String::from_utf8_lossy(&out.stdout);
                let last = text.lines().last().unwrap_or_default().trim();
                let path = StorePath::new(last).map_err(|e| NixError::Output {
                    argv: format!("nix-build {}", args.join(" ")),
                    message: e.to_string(),
                })?;
                Ok(Built {
                    path,
                    log: out.stderr,
                })
            }
        }
    }

    /// The derivation of a system, without building it.
    pub fn derivation(&self, target: &Target) -> Result<StorePath, NixError> {
        let restriction = self.restriction(target);
        let out = match target {
            Target::Flake { dir, host } => {
                let attr = Target::flake_attr(dir, host, ".drvPath");
                self.run("nix", &["eval", "--raw", &attr])?
            }
            Target::Classic { dir } => {
                let config = format!("nixos-config={}", dir.join("configuration.nix").display());
                let mut args: Vec<&str> = vec!["<nixpkgs/nixos>", "-A", TOPLEVEL, "-I", &config];
                args.extend(restriction.iter().map(String::as_str));
                self.run("nix-instantiate", &args)?
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or_default().trim().to_owned();
        StorePath::new(&last).map_err(|e| NixError::Output {
            argv: "nix eval drvPath".into(),
            message: e.to_string(),
        })
    }

    /// Points `profile` at `path`, adding a generation (what nixos-rebuild does).
    pub fn set_profile(&self, profile: &Path, path: &StorePath) -> Result<(), NixError> {
        self.run(
            "nix-env",
            &[
                OsStr::new("-p"),
                profile.as_os_str(),
                OsStr::new("--set"),
                OsStr::new(path.as_str()),
            ],
        )?;
        Ok(())
    }

    /// Re-locks the flake in `dir` (every input, or only `input`), read as a `path:` flake
    /// so untracked files count and no git metadata is needed. Used by `bento flake-update`
    /// on the server and by an agent's self-update alike.
    pub fn flake_update(&self, dir: &Path, input: Option<&str>) -> Result<(), NixError> {
        let flake = format!("path:{}", dir.display());
        match input {
            Some(input) => self.run("nix", &["flake", "lock", "--update-input", input, &flake])?,
            None => self.run("nix", &["flake", "update", &flake])?,
        };
        Ok(())
    }
}

impl Nix {
    /// A new binary-cache signing key, `name:base64` (`nix key generate-secret`).
    pub fn generate_secret_key(&self, name: &str) -> Result<String, NixError> {
        let args = ["key", "generate-secret", "--key-name", name];
        let out = self.run("nix", &args)?;
        let key = out.stdout_text().trim().to_owned();
        if !key.starts_with(&format!("{name}:")) {
            return Err(NixError::Output {
                argv: format!("nix {}", args.join(" ")),
                message: "not a name:base64 secret key".into(),
            });
        }
        Ok(key)
    }
}

/// The group of Nix's build users.
const BUILD_USERS_GROUP: &str = "nixbld";

/// Whether `nixbld` exists with members (Nix refuses a build-users-group without any).
fn build_users_exist() -> bool {
    unix::unistd::Group::from_name(BUILD_USERS_GROUP)
        .ok()
        .flatten()
        .is_some_and(|g| !g.mem.is_empty())
}

fn parse_build_json(stdout: &[u8]) -> Result<StorePath, String> {
    #[derive(serde::Deserialize)]
    struct One {
        outputs: std::collections::BTreeMap<String, String>,
    }
    let built: Vec<One> = serde_json::from_slice(stdout).map_err(|e| e.to_string())?;
    let out = built
        .first()
        .and_then(|b| b.outputs.get("out"))
        .ok_or_else(|| "no `out` output in the build result".to_owned())?;
    StorePath::new(out).map_err(|e| e.to_string())
}

/// Where a profile link points: the system store path it selects.
pub fn profile_target(profile: &Path) -> std::io::Result<Option<StorePath>> {
    match std::fs::canonicalize(profile) {
        Ok(p) => Ok(p.to_str().and_then(|s| StorePath::new(s).ok())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_paths() {
        let p = StorePath::new("/nix/store/6x2qmbmbawhx4s6w4wyr8j9lmzz3q5fh-nixos-system-alpha-1")
            .unwrap();
        assert_eq!(p.short_hash(8), "6x2qmbmb");
        assert_eq!(p.name(), "nixos-system-alpha-1");
        for bad in [
            "/nix/store/short-x",
            "/tmp/6x2qmbmbawhx4s6w4wyr8j9lmzz3q5fh-x",
            "/nix/store/6x2qmbmbawhx4s6w4wyr8j9lmzz3q5fh-",
        ] {
            assert!(StorePath::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn build_json() {
        let out = br#"[{"drvPath":"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv","outputs":{"out":"/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-x"}}]"#;
        assert_eq!(
            parse_build_json(out).unwrap().as_str(),
            "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-x"
        );
        assert!(parse_build_json(b"[]").is_err());
    }
}
pub mod closure;
/// Nix error locations mapped back to the fleet repo (issue #12).
pub mod locate;
/// Prebuilt delivery: what the store lacks, signed imports from a file binary cache.
pub mod substitute;
