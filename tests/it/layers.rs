//! The architecture as a test (docs/architecture.md): which layer may import which, no import
//! circles between modules, and no source file too long to read. It reads `src/` as text, so
//! it needs neither root nor Nix.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers bottom to top; a module may import its own layer or a lower one. `server` and
/// `agent` share a rank but may not import each other: they meet only in `protocol`.
const LAYERS: &[(&str, u8)] = &[
    ("sys", 0),
    ("protocol", 1),
    ("nix", 2),
    ("server", 3),
    ("agent", 3),
    ("cli", 4),
];

/// Longest a source file may be, not counting its `#[cfg(test)]` module.
const MAX_LINES: usize = 600;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/server/publish/host.rs` → `["server", "publish", "host"]`.
fn module_path(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_str().unwrap().trim_end_matches(".rs").to_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

/// The code a reader maintains: everything before the first top-level `#[cfg(test)]` item
/// that is not a declaration of a test module kept in its own file (`#[cfg(test)] mod x;`
/// early in a file must not hide the rest of it from the line limit).
fn code(text: &str) -> &str {
    let mut from = 0;
    while let Some(i) = text[from..].find("\n#[cfg(test)]").map(|i| i + from) {
        let next = text[i + 1..].lines().nth(1).unwrap_or("").trim();
        let declaration = next.ends_with(';')
            && next
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub ")
                .starts_with("mod ");
        if !declaration {
            return &text[..i];
        }
        from = i + 1;
    }
    text
}

/// Paths a file names, as module paths from the crate root: `crate::a::b::C`,
/// `use crate::{a, b::c}` and `super::x` (resolved against `here`).
fn referenced(text: &str, here: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    for (start, prefix) in [("crate::", None), ("super::", Some(()))] {
        let mut from = 0;
        while let Some(i) = text[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0 && (ident(bytes[at - 1]) || bytes[at - 1] == b':') {
                continue;
            }
            let mut base: Vec<String> = match prefix {
                None => Vec::new(),
                Some(()) => {
                    // `super::` from `a/b.rs` (module a::b) is `a`; chains climb further.
                    let mut b = here.to_vec();
                    b.pop();
                    let mut rest = &text[from..];
                    while let Some(r) = rest.strip_prefix("super::") {
                        b.pop();
                        rest = r;
                        from += "super::".len();
                    }
                    b
                }
            };
            let rest = &text[from..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            base.extend(
                rest[..end]
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            );
            match rest[end..].strip_prefix('{') {
                // `crate::a::{b, c::D}`: one path per item (nested groups count as their head).
                Some(group) => {
                    let close = group.find('}').unwrap_or(group.len());
                    for item in group[..close].split(',') {
                        let mut p = base.clone();
                        p.extend(
                            item.split("::")
                                .map(|s| s.trim().trim_start_matches('{').to_owned())
                                .filter(|s| !s.is_empty() && s.bytes().all(ident)),
                        );
                        out.push(p);
                    }
                }
                None => out.push(base),
            }
        }
    }
    out
}

/// The unit a path belongs to: a layer's direct submodule (`server::publish`,
/// `protocol::manifest`, `cli::build`) when that module exists, else the layer itself.
fn node(path: &[String], modules: &BTreeSet<Vec<String>>) -> Option<String> {
    let layer = path.first()?;
    if !LAYERS.iter().any(|(l, _)| l == layer) {
        return None;
    }
    match path.get(1) {
        Some(sub) if modules.contains(&vec![layer.clone(), sub.clone()]) => {
            Some(format!("{layer}::{sub}"))
        }
        _ => Some(layer.clone()),
    }
}

fn rank(node: &str) -> u8 {
    let layer = node.split("::").next().unwrap();
    LAYERS.iter().find(|(l, _)| *l == layer).unwrap().1
}

fn graph() -> BTreeMap<String, BTreeMap<String, String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_path(f)).collect();
    // edges[from][to] = a file that makes the edge, for the failure message.
    let mut edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in &files {
        let here = module_path(file);
        let Some(from) = node(&here, &modules) else {
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for path in referenced(code(&text), &here) {
            if let Some(to) = node(&path, &modules) {
                if to != from {
                    let shown = file.strip_prefix(src()).unwrap().display().to_string();
                    edges
                        .entry(from.clone())
                        .or_default()
                        .entry(to)
                        .or_insert(shown);
                }
            }
        }
    }
    edges
}

#[test]
fn layers_import_only_downwards_and_sides_never_meet() {
    let mut wrong = Vec::new();
    for (from, tos) in graph() {
        for (to, file) in tos {
            let (a, b) = (
                from.split("::").next().unwrap(),
                to.split("::").next().unwrap(),
            );
            let sideways = a != b && rank(&from) == rank(&to);
            if rank(&to) > rank(&from) || sideways {
                wrong.push(format!("{from} -> {to} (in src/{file})"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports across layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_import_circles_between_modules() {
    let edges = graph();
    // Depth-first search for a back edge; report the first circle found.
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeMap<String, String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut circle = stack[i..].to_vec();
            circle.push(n.to_owned());
            return Some(circle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_owned());
        for to in edges.get(n).into_iter().flat_map(|t| t.keys()) {
            if let Some(c) = visit(to, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        if let Some(circle) = visit(n, &edges, &mut Vec::new(), &mut done) {
            let steps: Vec<String> = circle
                .windows(2)
                .map(|w| format!("{} -> {} (src/{})", w[0], w[1], edges[&w[0]][&w[1]]))
                .collect();
            panic!("import circle:\n{}", steps.join("\n"));
        }
    }
}

#[test]
fn no_source_file_is_over_600_lines() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            let n = code(&text).lines().count();
            (n > MAX_LINES).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    long.sort();
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_checker_sees_imports_and_circles() {
    // The walker must see the shapes of import the codebase uses, or the tests above pass
    // vacuously.
    let here: Vec<String> = ["cli", "build"].iter().map(|s| s.to_string()).collect();
    let text = "use crate::server::{publish::Plan, fleet};\nlet x = super::publish::parse(a);\n\
                use crate::protocol::manifest::Manifest;";
    let got = referenced(text, &here);
    let want: Vec<Vec<String>> = [
        &["server", "publish", "Plan"][..],
        &["server", "fleet"],
        &["protocol", "manifest", "Manifest"],
        &["cli", "publish", "parse"],
    ]
    .iter()
    .map(|p| p.iter().map(|s| s.to_string()).collect())
    .collect();
    for w in &want {
        assert!(got.contains(w), "missing {w:?} in {got:?}");
    }
    assert!(graph().len() > 10, "the walker found almost no modules");
}
