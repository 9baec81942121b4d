//! Where an error really is: Nix reports files by the path it read them from — a scratch
//! copy of a host's configuration (`/tmp/bento-eval-…/configuration.nix`) or the store copy
//! of a `path:` flake (`/nix/store/<hash>-source/machines/alpha.nix`) — which means nothing
//! to the person who has to fix it. A `SourceMap` rewrites those paths to the file's path in
//! the fleet repo (`hosts/alpha/configuration.nix`, or `common/base.nix` for a file reached
//! through a symlink). Pure text in, text out; the server uses it for `bento publish`'s
//! evaluation gate and `bento build`, and the agent can use it for its own build errors with
//! the paths of its manifest.
//!
//! Invariant: only a path whose remainder is a file of the configuration tree is rewritten
//! under a `/nix/store/…-source` prefix (another flake's source, e.g. nixpkgs, is left alone);
//! under an explicit root (the scratch copy) every path is rewritten.

use std::collections::BTreeMap;

/// Maps configuration-tree paths to what a message should say instead.
#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    /// Directories holding a copy of the tree (scratch directories), without trailing `/`.
    roots: Vec<String>,
    /// Scratch directories known by their name's start (`/tmp/bento-build-`): the random
    /// rest of the name is matched as letters, digits and `_`.
    prefixes: Vec<String>,
    /// Tree path (`common/base.nix`) → shown path (`common/base.nix` in the fleet repo).
    files: BTreeMap<String, String>,
    /// For a tree path under a root that is not in `files`: `<base>/<path>`.
    base: String,
}

/// Characters that end a path in Nix's messages.
fn ends_path(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            ':' | '\'' | '"' | '`' | '«' | '»' | ',' | ')' | '(' | ';'
        )
}

impl SourceMap {
    /// `files`: (tree path, shown path); `base`: the tree's directory in the repo, for paths
    /// under a scratch root that `files` does not list.
    pub fn new(files: impl IntoIterator<Item = (String, String)>, base: &str) -> Self {
        Self {
            roots: Vec::new(),
            prefixes: Vec::new(),
            files: files.into_iter().collect(),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// Adds a directory that holds a copy of the tree (where Nix was pointed at).
    pub fn with_root(mut self, root: &std::path::Path) -> Self {
        let root = root.to_string_lossy().trim_end_matches('/').to_owned();
        if !root.is_empty() {
            self.roots.push(root);
        }
        self
    }

    /// Adds every scratch directory whose path starts with `prefix` (made with `tempfile`).
    pub fn with_scratch_prefix(mut self, prefix: &std::path::Path) -> Self {
        self.prefixes.push(prefix.to_string_lossy().into_owned());
        self
    }

    fn shown(&self, rel: &str, under_root: bool) -> Option<String> {
        match self.files.get(rel) {
            Some(s) => Some(s.clone()),
            None if under_root && self.base.is_empty() => Some(rel.to_owned()),
            None if under_root => Some(format!("{}/{rel}", self.base)),
            None => None,
        }
    }

    /// Rewrites every known path in `text`.
    pub fn rewrite(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        'scan: while !rest.is_empty() {
            // The earliest prefix: a scratch root, or a `-source` store path.
            let mut best: Option<(usize, usize, bool)> = None; // (at, prefix len, root)
            for root in &self.roots {
                if let Some(i) = find_dir(rest, root) {
                    if best.is_none_or(|(b, _, _)| i < b) {
                        best = Some((i, root.len() + 1, true));
                    }
                }
            }
            for prefix in &self.prefixes {
                if let Some((i, len)) = find_scratch(rest, prefix) {
                    if best.is_none_or(|(b, _, _)| i < b) {
                        best = Some((i, len, true));
                    }
                }
            }
            if let Some((i, len)) = find_source(rest) {
                if best.is_none_or(|(b, _, _)| i < b) {
                    best = Some((i, len, false));
                }
            }
            let Some((at, len, under_root)) = best else {
                out.push_str(rest);
                break 'scan;
            };
            let after = &rest[at + len..];
            let end = after.find(ends_path).unwrap_or(after.len());
            let rel = &after[..end];
            out.push_str(&rest[..at]);
            match self.shown(rel, under_root) {
                Some(shown) if !rel.is_empty() => out.push_str(&shown),
                _ => out.push_str(&rest[at..at + len + end]),
            }
            rest = &after[end..];
        }
        out
    }
}

/// `dir/` as a whole path component in `text`.
fn find_dir(text: &str, dir: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = text[from..].find(dir) {
        let at = from + i;
        let before_ok = at == 0 || ends_path(text[..at].chars().next_back().unwrap_or(' '));
        if before_ok && text[at + dir.len()..].starts_with('/') {
            return Some(at);
        }
        from = at + dir.len();
    }
    None
}

/// `<prefix><random>/` in `text`: (index, length including the `/`).
fn find_scratch(text: &str, prefix: &str) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(i) = text[from..].find(prefix) {
        let at = from + i;
        let after = &text[at + prefix.len()..];
        let n = after
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        let before_ok = at == 0 || ends_path(text[..at].chars().next_back().unwrap_or(' '));
        if before_ok && n > 0 && after[n..].starts_with('/') {
            return Some((at, prefix.len() + n + 1));
        }
        from = at + prefix.len();
    }
    None
}

/// `/nix/store/<32 chars>-source/` in `text`: (index, prefix length including the `/`).
fn find_source(text: &str) -> Option<(usize, usize)> {
    const STORE: &str = "/nix/store/";
    const SUFFIX: &str = "-source/";
    let mut from = 0;
    while let Some(i) = text[from..].find(STORE) {
        let at = from + i;
        let hash = text.get(at + STORE.len()..at + STORE.len() + 32);
        let tail = text.get(at + STORE.len() + 32..);
        if hash.is_some_and(|h| h.bytes().all(|b| b.is_ascii_alphanumeric()))
            && tail.is_some_and(|t| t.starts_with(SUFFIX))
        {
            return Some((at, STORE.len() + 32 + SUFFIX.len()));
        }
        from = at + STORE.len();
    }
    None
}

/// The first `at <file>:<line>:<col>` location in a Nix error, without the trailing colon.
pub fn first_location(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let l = l.trim();
        let loc = l.strip_prefix("at ")?.trim_end_matches(':');
        // `file:line:col`: the last two parts are numbers.
        let mut parts = loc.rsplitn(3, ':');
        let (col, line) = (parts.next()?, parts.next()?);
        let ok = parts.next().is_some()
            && col.bytes().all(|b| b.is_ascii_digit())
            && line.bytes().all(|b| b.is_ascii_digit());
        ok.then(|| loc.to_owned())
    })
}

/// One line for a failed Nix command: the first `error:` line of its (already rewritten)
/// log, else `fallback`, and ` (at <file>:<line>:<col>)` when Nix named a location.
pub fn summary(log: &str, fallback: &str) -> String {
    let first = log
        .lines()
        .find(|l| l.trim_start().starts_with("error:"))
        .unwrap_or(fallback)
        .trim();
    match first_location(log) {
        Some(at) if !first.contains(&at) => format!("{first} (at {at})"),
        _ => first.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> SourceMap {
        SourceMap::new(
            [
                (
                    "configuration.nix".to_owned(),
                    "hosts/web/configuration.nix".to_owned(),
                ),
                ("common/base.nix".to_owned(), "common/base.nix".to_owned()),
            ],
            "hosts/web",
        )
        .with_root(std::path::Path::new("/tmp/bento-eval-x1"))
    }

    #[test]
    fn scratch_and_store_paths_become_fleet_paths() {
        let m = map();
        let nix = "error: syntax error, unexpected '=', expecting ';'\n\n       at /tmp/bento-eval-x1/configuration.nix:2:11:\n\n            1| { hostName = \"x\"\n";
        let out = m.rewrite(nix);
        assert!(
            out.contains("at hosts/web/configuration.nix:2:11:"),
            "{out}"
        );
        assert!(!out.contains("/tmp/"), "{out}");
        assert_eq!(
            first_location(&out).as_deref(),
            Some("hosts/web/configuration.nix:2:11")
        );
        let flake = "error: cannot add a string to an integer\n\n       at /nix/store/hy2zk00skhnq8sk83cmnpfdqcw2fw0fm-source/common/base.nix:1:33:\n";
        assert!(m.rewrite(flake).contains("at common/base.nix:1:33:"));
        // «path» quoting, several paths on a line, a file the map does not know under the root.
        let out = m.rewrite("while evaluating «/tmp/bento-eval-x1/extra.nix» from '/tmp/bento-eval-x1/configuration.nix'");
        assert_eq!(
            out,
            "while evaluating «hosts/web/extra.nix» from 'hosts/web/configuration.nix'"
        );
    }

    #[test]
    fn scratch_prefixes_match_any_random_name() {
        let m = SourceMap::new(Vec::new(), "hosts/c1")
            .with_scratch_prefix(std::path::Path::new("/tmp/bento-build-"));
        assert_eq!(
            m.rewrite("at /tmp/bento-build-Ab3_x9/configuration.nix:1:2: and /tmp/bento-build-/x"),
            "at hosts/c1/configuration.nix:1:2: and /tmp/bento-build-/x"
        );
    }

    #[test]
    fn other_paths_are_left_alone() {
        let m = map();
        for text in [
            "at /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-source/lib/modules.nix:10:3:",
            "/tmp/bento-eval-x10/configuration.nix",
            "/nix/store/short-source/configuration.nix",
            "no paths at all",
            "",
        ] {
            assert_eq!(m.rewrite(text), text);
        }
        assert_eq!(first_location("at nothing"), None);
        assert_eq!(
            summary(
                "warning: x\nerror: boom\n\n       at a.nix:3:1:\n",
                "fallback"
            ),
            "error: boom (at a.nix:3:1)"
        );
        assert_eq!(summary("", " nix failed "), "nix failed");
        assert_eq!(
            first_location("  at a.nix:3:1:").as_deref(),
            Some("a.nix:3:1")
        );
    }
}
