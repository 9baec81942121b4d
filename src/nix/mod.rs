//! Running Nix. Every invocation goes through one runner that turns the child's outcome
//! into a typed result; a failure keeps the argv and the tail of stderr so the message says
//! what was run and why it failed.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Flags that make the `nix` command (not `nix-build`) usable on any Nix ≥ 2.4 without a
/// matching `nix.conf`.
const EXPERIMENTAL: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];
/// How much of a failing command's stderr an error carries.
pub const STDERR_TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("cannot run `{argv}`: {source} (is Nix installed and on PATH?)")]
    Spawn {
        argv: String,
        source: std::io::Error,
    },
    #[error("`{argv}` failed ({status}):\n{stderr_tail}")]
    Failed {
        argv: String,
        status: String,
        stderr_tail: String,
        /// Everything the command printed on stderr (build logs).
        stderr: String,
    },
    #[error("`{argv}` printed something unexpected: {message}")]
    Output { argv: String, message: String },
}

impl NixError {
    /// The full stderr of a failed command, when there is one.
    pub fn log(&self) -> &str {
        match self {
            NixError::Failed { stderr, .. } => stderr,
            _ => "",
        }
    }
}

/// The last `n` lines of a command's output.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A path in the Nix store: `/nix/store/<32-char hash>-<name>`.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct StorePath(String);

#[derive(Debug, thiserror::Error)]
#[error("not a Nix store path: {0:?}")]
pub struct BadStorePath(pub String);

impl StorePath {
    pub fn new(s: &str) -> Result<Self, BadStorePath> {
        let ok = s
            .strip_prefix("/nix/store/")
            .and_then(|rest| rest.split_once('-'))
            .is_some_and(|(hash, name)| {
                hash.len() == 32
                    && hash.bytes().all(|b| b.is_ascii_alphanumeric())
                    && !name.is_empty()
                    && !name.contains('/')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadStorePath(s.chars().take(200).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }

    /// The 32-character hash part, shortened to `n` characters for tables.
    pub fn short_hash(&self, n: usize) -> &str {
        &self.0["/nix/store/".len().."/nix/store/".len() + n.min(32)]
    }

    /// The name part after the hash (`nixos-system-alpha-24.05`).
    pub fn name(&self) -> &str {
        &self.0["/nix/store/".len() + 33..]
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for StorePath {
    type Error = BadStorePath;
    fn try_from(s: String) -> Result<Self, BadStorePath> {
        StorePath::new(&s)
    }
}

impl From<StorePath> for String {
    fn from(p: StorePath) -> String {
        p.0
    }
}

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
}

/// Output of one command: stdout, stderr.
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Nix {
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs `program args…`; `nix` itself gets the experimental-features flags.
    pub fn run<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Result<Output, NixError> {
        let mut cmd = Command::new(program);
        if program == "nix" {
            cmd.args(EXPERIMENTAL);
        }
        cmd.args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        let argv = std::iter::once(program.to_owned())
            .chain(
                args.iter()
                    .map(|a| a.as_ref().to_string_lossy().into_owned()),
            )
            .collect::<Vec<_>>()
            .join(" ");
        tracing::debug!(%argv, "running");
        let out = cmd.output().map_err(|source| NixError::Spawn {
            argv: argv.clone(),
            source,
        })?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(NixError::Failed {
                argv,
                status: out.status.to_string(),
                stderr_tail: tail(&stderr, STDERR_TAIL_LINES),
                stderr,
            });
        }
        Ok(Output {
            stdout: out.stdout,
            stderr,
        })
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
        match target {
            Target::Flake { dir, host } => {
                let attr = Target::flake_attr(dir, host, "");
                let args = ["build", "--no-link", "--json", "--print-build-logs", &attr];
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
                let args = [
                    "<nixpkgs/nixos>",
                    "-A",
                    TOPLEVEL,
                    "-I",
                    &config,
                    "--no-out-link",
                ];
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
        let out = match target {
            Target::Flake { dir, host } => {
                let attr = Target::flake_attr(dir, host, ".drvPath");
                self.run("nix", &["eval", "--raw", &attr])?
            }
            Target::Classic { dir } => {
                let config = format!("nixos-config={}", dir.join("configuration.nix").display());
                self.run(
                    "nix-instantiate",
                    &["<nixpkgs/nixos>", "-A", TOPLEVEL, "-I", &config],
                )?
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
