//! What changes between two systems: package versions added, removed and changed, and the
//! closure sizes. Uses `nvd diff` when it is on PATH (its report is shown as it is), and
//! `nix store diff-closures` otherwise (parsed into typed changes).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Nix, NixError, StorePath};

#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    #[error("{0} is not in this server's Nix store")]
    NotInStore(StorePath),
    #[error(transparent)]
    Nix(#[from] NixError),
}

/// What a package did between the two closures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Removed,
    Changed,
}

/// One line of `nix store diff-closures`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub name: String,
    pub kind: ChangeKind,
    /// Versions before and after (empty when absent; `ε` is a package without a version).
    pub before: Vec<String>,
    pub after: Vec<String>,
    /// Size change as Nix prints it (`+12.3 KiB`), when there is one.
    pub size_delta: Option<String>,
}

/// Which tool produced the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tool {
    Nvd,
    DiffClosures,
}

/// A comparison of two systems.
#[derive(Debug, Clone, Serialize)]
pub struct ClosureDiff {
    pub tool: Tool,
    /// Parsed changes (`diff-closures` only).
    pub changes: Vec<Change>,
    /// nvd's report, as it printed it.
    pub text: Option<String>,
    pub size_before: Option<u64>,
    pub size_after: Option<u64>,
}

/// The first `nvd` on PATH, if any.
pub fn find_nvd() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("nvd"))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Fails with `NotInStore` unless `path` is a valid path of the local store.
pub fn check_in_store(nix: &Nix, path: &StorePath) -> Result<(), ClosureError> {
    if !path.as_path().exists() {
        return Err(ClosureError::NotInStore(path.clone()));
    }
    match nix.run("nix-store", &["--check-validity", path.as_str()]) {
        Ok(_) => Ok(()),
        Err(NixError::Command(e)) if e.exit_code().is_some() => {
            Err(ClosureError::NotInStore(path.clone()))
        }
        Err(e) => Err(e.into()),
    }
}

/// The closure size of each path (`nix path-info -S --json`), in the order given.
pub fn closure_sizes(nix: &Nix, paths: &[&StorePath]) -> Result<Vec<Option<u64>>, NixError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Info {
        path: String,
        closure_size: Option<u64>,
    }
    let mut args = vec!["path-info", "--json", "--closure-size"];
    args.extend(paths.iter().map(|p| p.as_str()));
    let out = nix.run("nix", &args)?;
    let infos: Vec<Info> = serde_json::from_slice(&out.stdout).map_err(|e| NixError::Output {
        argv: format!("nix {}", args.join(" ")),
        message: e.to_string(),
    })?;
    Ok(paths
        .iter()
        .map(|p| {
            infos
                .iter()
                .find(|i| i.path == p.as_str())
                .and_then(|i| i.closure_size)
        })
        .collect())
}

/// Compares the closures of `before` and `after`, both of which must be in the store.
pub fn diff(
    nix: &Nix,
    nvd: Option<&Path>,
    before: &StorePath,
    after: &StorePath,
) -> Result<ClosureDiff, ClosureError> {
    check_in_store(nix, before)?;
    check_in_store(nix, after)?;
    let sizes = closure_sizes(nix, &[before, after])?;
    let (tool, changes, text) = match nvd {
        Some(nvd) => {
            let out = nix.run(
                &nvd.to_string_lossy(),
                &["diff", before.as_str(), after.as_str()],
            )?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (Tool::Nvd, Vec::new(), Some(text))
        }
        None => {
            let out = nix.run(
                "nix",
                &["store", "diff-closures", before.as_str(), after.as_str()],
            )?;
            let changes = parse_diff_closures(&String::from_utf8_lossy(&out.stdout));
            (Tool::DiffClosures, changes, None)
        }
    };
    Ok(ClosureDiff {
        tool,
        changes,
        text,
        size_before: sizes[0],
        size_after: sizes[1],
    })
}

/// Removes ANSI escape sequences (Nix colours sizes even in some non-terminal setups).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn versions(s: &str) -> Vec<String> {
    let s = s.trim();
    if s == "∅" || s.is_empty() {
        return Vec::new();
    }
    s.split(", ").map(|v| v.trim().to_owned()).collect()
}

/// Parses `nix store diff-closures` output: `name: 1.0, 1.1 → 1.2, +3.0 KiB` per line,
/// `∅` for a package that is absent on one side.
pub fn parse_diff_closures(text: &str) -> Vec<Change> {
    let mut changes = Vec::new();
    for line in strip_ansi(text).lines() {
        let line = line.trim();
        let Some((name, rest)) = line.split_once(": ") else {
            continue;
        };
        let Some((before, mut after)) = rest.split_once(" → ") else {
            continue;
        };
        let mut size_delta = None;
        if let Some((vers, size)) = after.rsplit_once(", ") {
            if (size.starts_with('+') || size.starts_with('-')) && size.ends_with("iB") {
                size_delta = Some(size.to_owned());
                after = vers;
            }
        }
        let (before, after) = (versions(before), versions(after));
        let kind = match (before.is_empty(), after.is_empty()) {
            (true, _) => ChangeKind::Added,
            (_, true) => ChangeKind::Removed,
            _ => ChangeKind::Changed,
        };
        changes.push(Change {
            name: name.to_owned(),
            kind,
            before,
            after,
            size_delta,
        });
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_diff_closures() {
        let text = "linux: 6.1.0 → 6.1.1\n\
                    nixos-system-alpha: 1 → 2, +0.1 KiB\n\
                    \x1b[1mhello\x1b[0m: ∅ → 2.12, \x1b[31;1m+120.5 KiB\x1b[0m\n\
                    old-tool: 1.0, 1.1 → ∅, -3.0 KiB\n\
                    zlib: ε → 1.3\n";
        let c = parse_diff_closures(text);
        type Row<'a> = (
            &'a str,
            ChangeKind,
            Vec<String>,
            Vec<String>,
            Option<&'a str>,
        );
        let summary: Vec<Row> = c
            .iter()
            .map(|c| {
                (
                    c.name.as_str(),
                    c.kind,
                    c.before.clone(),
                    c.after.clone(),
                    c.size_delta.as_deref(),
                )
            })
            .collect();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            summary,
            vec![
                (
                    "linux",
                    ChangeKind::Changed,
                    s(&["6.1.0"]),
                    s(&["6.1.1"]),
                    None
                ),
                (
                    "nixos-system-alpha",
                    ChangeKind::Changed,
                    s(&["1"]),
                    s(&["2"]),
                    Some("+0.1 KiB")
                ),
                (
                    "hello",
                    ChangeKind::Added,
                    s(&[]),
                    s(&["2.12"]),
                    Some("+120.5 KiB")
                ),
                (
                    "old-tool",
                    ChangeKind::Removed,
                    s(&["1.0", "1.1"]),
                    s(&[]),
                    Some("-3.0 KiB")
                ),
                ("zlib", ChangeKind::Changed, s(&["ε"]), s(&["1.3"]), None),
            ]
        );
    }
}
