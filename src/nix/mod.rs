//! Running Nix. Every invocation goes through `Nix::run`, which turns the child's outcome
//! into a typed result; a failure keeps the argv and the tail of stderr so the message says
//! what was run and why it failed.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

/// Flags that make the `nix` command (not `nix-build`) usable on any Nix ≥ 2.4 without a
/// matching `nix.conf`.
const EXPERIMENTAL: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];
/// How much of a failing command's stderr an error carries.
const STDERR_TAIL_LINES: usize = 20;

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
    },
    #[error("`{argv}` printed something unexpected: {message}")]
    Output { argv: String, message: String },
}

/// The last `n` lines of a command's output.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs Nix commands. The program names are fields so tests and odd installs can override.
#[derive(Debug, Clone)]
pub struct Nix {
    nix: OsString,
}

impl Default for Nix {
    fn default() -> Self {
        Self { nix: "nix".into() }
    }
}

impl Nix {
    fn run(&self, args: &[&str]) -> Result<Vec<u8>, NixError> {
        let mut cmd = Command::new(&self.nix);
        cmd.args(EXPERIMENTAL).args(args);
        let argv = format!("{} {}", self.nix.to_string_lossy(), args.join(" "));
        tracing::debug!(%argv, "running");
        let out = cmd.output().map_err(|source| NixError::Spawn {
            argv: argv.clone(),
            source,
        })?;
        if !out.status.success() {
            return Err(NixError::Failed {
                argv,
                status: out.status.to_string(),
                stderr_tail: tail(&String::from_utf8_lossy(&out.stderr), STDERR_TAIL_LINES),
            });
        }
        Ok(out.stdout)
    }

    /// The attribute names of `nixosConfigurations` of the flake in `dir` (read as a
    /// `path:` flake, so untracked files count and no git metadata is needed).
    pub fn flake_nixos_configurations(&self, dir: &Path) -> Result<Vec<String>, NixError> {
        let flake = format!("path:{}#nixosConfigurations", dir.display());
        let args = ["eval", "--json", &flake, "--apply", "builtins.attrNames"];
        let out = self.run(&args)?;
        serde_json::from_slice(&out).map_err(|e| NixError::Output {
            argv: format!("nix {}", args.join(" ")),
            message: e.to_string(),
        })
    }
}
