//! The examples in docs/ are real: they parse with the code that reads them.

use std::path::Path;
use std::sync::Arc;

use bento::protocol::manifest::{Digest, Manifest};
use bento::protocol::HostName;
use bento::server::snapshot::{Item, ItemKind};

fn block(doc: &str, info: &str) -> String {
    let start = doc
        .find(&format!("```{info}\n"))
        .unwrap_or_else(|| panic!("no ```{info} block"));
    let body = &doc[start + info.len() + 4..];
    body[..body.find("```").unwrap()].to_owned()
}

fn protocol() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/protocol.md")).unwrap()
}

#[test]
fn manifest_example_is_canonical_and_its_digest_is_the_documented_one() {
    let doc = protocol();
    let bytes = block(&doc, "json manifest-example");
    let current = block(&doc, "text current-example");
    let digest_line = doc
        .lines()
        .find(|l| l.starts_with("sha256 of exactly these bytes. Example (digest"))
        .expect("digest sentence");
    let digest: Digest = digest_line.split('`').nth(1).unwrap().parse().unwrap();
    let m = Manifest::parse_untrusted(bytes.as_bytes(), &digest, &HostName::new("alpha").unwrap())
        .expect("documented manifest parses and matches its digest");
    assert_eq!(
        String::from_utf8(m.to_bytes()).unwrap(),
        bytes,
        "documented manifest is canonical"
    );
    assert_eq!(m.files[0].mode.to_string(), "0640");
    assert_eq!(
        bento::protocol::layout::parse_current(&current).unwrap(),
        digest,
        "the `current` example"
    );
}

/// Issue #26: the format-2 manifest, its trees and its packs, as documented, are what the
/// code writes and reads: digests, one byte form, expansion and each pack's bytes.
#[test]
fn format_2_examples_expand_to_the_documented_files_and_packs() {
    use bento::protocol::tree::Tree;
    let doc = protocol();
    let bytes = block(&doc, "json manifest2-example");
    let digest_line = doc
        .lines()
        .find(|l| l.starts_with("(digest `"))
        .expect("format 2 digest sentence");
    let digest: Digest = digest_line.split('`').nth(1).unwrap().parse().unwrap();
    let mut m =
        Manifest::parse_untrusted(bytes.as_bytes(), &digest, &HostName::new("alpha").unwrap())
            .expect("documented format-2 manifest parses and matches its digest");
    assert_eq!(String::from_utf8(m.to_bytes()).unwrap(), bytes, "canonical");

    let trees: std::collections::BTreeMap<Digest, Vec<u8>> = block(&doc, "json tree-example")
        .lines()
        .map(|l| {
            let b = format!("{l}\n").into_bytes();
            (Digest::of(&b), b)
        })
        .collect();
    m.expand(|d| {
        trees
            .get(d)
            .cloned()
            .ok_or(bento::protocol::tree::TreeError::Missing {
                tree: *d,
                reason: "not documented".into(),
            })
    })
    .expect("the documented trees expand the manifest");
    let files: Vec<(String, String)> = block(&doc, "text format2-files")
        .lines()
        .map(|l| {
            let (p, c) = l.split_once(": ").unwrap();
            (p.to_owned(), format!("{c}\n"))
        })
        .collect();
    let listed: Vec<String> = m.config.iter().map(|e| e.path().to_string()).collect();
    assert_eq!(
        listed,
        ["common", "common/base.nix", "common/users.nix", "flake.nix"]
    );
    for (path, content) in &files {
        let entry = m.config.iter().find(|e| e.path().as_str() == path).unwrap();
        let bento::protocol::manifest::ConfigEntry::File { sha256, .. } = entry else {
            panic!("{path} is a file")
        };
        assert_eq!(*sha256, Digest::of(content.as_bytes()), "{path}");
    }
    // Each tree's packs are its files' contents back to back, in name order.
    for (d, b) in &trees {
        let tree = Tree::parse_untrusted(b, d).unwrap();
        for (pack, chunk) in tree
            .packs
            .iter()
            .zip(bento::protocol::tree::chunks(&tree.entries))
        {
            let bytes: Vec<u8> = chunk
                .iter()
                .flat_map(|(sha, _)| {
                    files
                        .iter()
                        .find(|(_, c)| Digest::of(c.as_bytes()) == *sha)
                        .unwrap()
                        .1
                        .clone()
                        .into_bytes()
                })
                .collect();
            assert_eq!(Digest::of(&bytes), *pack);
        }
    }
    let common = m
        .stored()
        .unwrap()
        .packs
        .values()
        .find(|p| p.size == 97)
        .unwrap();
    assert_eq!(
        common.entries.len(),
        2,
        "common/'s pack: base.nix at 0..45, users.nix at 45..97"
    );
}

/// Issue #27: the freshness stamp example verifies with the example key, names its host and
/// the documented `current`, and is refused once one byte of its line changes.
#[test]
fn freshness_stamp_example_verifies_and_parses() {
    use bento::protocol::freshness::FreshStamp;
    let doc = protocol();
    let stamp = block(&doc, "text freshness-example");
    let digest =
        bento::protocol::layout::parse_current(&block(&doc, "text current-example")).unwrap();
    let key_line = doc
        .lines()
        .find(|l| l.starts_with("(signed by the example key"))
        .expect("the example key sentence");
    let key = key_line.split('`').nth(1).unwrap().to_owned();
    let trusted = bento::protocol::signing::parse_trusted(&[key]).unwrap();
    let alpha = HostName::new("alpha").unwrap();
    let s = FreshStamp::parse_untrusted(stamp.as_bytes(), &alpha, &digest, Some(&trusted))
        .expect("the documented stamp verifies");
    assert_eq!(s.serial, 7);
    assert_eq!(s.not_after.as_str(), "2026-12-02T12:15:03Z");
    let bumped = stamp.replacen("\"serial\":7", "\"serial\":8", 1);
    assert!(
        FreshStamp::parse_untrusted(bumped.as_bytes(), &alpha, &digest, Some(&trusted)).is_err()
    );
}

#[test]
fn files_toml_example_is_accepted() {
    let doc = protocol();
    let toml_text = block(&doc, "toml files-example");
    let dir = tempfile::tempdir().unwrap();
    let toml_path = dir.path().join("files.toml");
    std::fs::write(&toml_path, toml_text).unwrap();
    let file = |path: &str, kind| Item {
        path: path.into(),
        kind,
    };
    let f = |src: &Path| ItemKind::File {
        source: Arc::from(src),
        size: 1,
        sha256: Digest::of(b"k"),
        executable: false,
    };
    let items = vec![
        file("files", ItemKind::Dir),
        file("files/etc", ItemKind::Dir),
        file("files/etc/wireguard", ItemKind::Dir),
        file("files/etc/wireguard/wg0.key", f(Path::new("/dev/null"))),
        file("files.toml", f(&toml_path)),
    ];
    let content = bento::server::hostfiles::split(&items, None, Path::new("hosts/alpha")).unwrap();
    assert_eq!(content.files[0].group, "systemd-network");
    assert_eq!(content.files[0].target.as_str(), "/etc/wireguard/wg0.key");
}

#[test]
fn report_and_heartbeat_examples_parse() {
    let doc = protocol();
    let hb =
        bento::protocol::report::Heartbeat::parse(block(&doc, "json heartbeat-example").as_bytes())
            .expect("heartbeat example");
    assert_eq!(hb.host.as_str(), "alpha");
    let r = bento::protocol::report::Report::parse(block(&doc, "json report-example").as_bytes())
        .expect("report example");
    assert_eq!(r.outcome, bento::protocol::report::Outcome::Success);
}

#[test]
fn agent_toml_example_parses() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/agent.md"))
        .unwrap();
    let text = block(&doc, "toml");
    let c = bento::agent::AgentConfig::parse(&text, Path::new("docs/agent.md"))
        .expect("documented agent.toml");
    assert_eq!(c.settings().mode, bento::agent::Mode::Switch);
}

#[test]
fn host_settings_example_parses() {
    let doc = protocol();
    let s: bento::protocol::settings::HostSettings =
        serde_json::from_str(&block(&doc, "json host-settings-example"))
            .expect("documented bento-host.json");
    assert_eq!(s.interval(), std::time::Duration::from_secs(900));
}

/// docs/reference.md's tables: heading (`### [server]`) → the keys of its rows (`| `key` |`).
fn reference_tables() -> std::collections::BTreeMap<String, Vec<String>> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reference.md"))
            .unwrap();
    let mut tables = std::collections::BTreeMap::<String, Vec<String>>::new();
    let mut heading = String::new();
    let mut file = String::new();
    for line in doc.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            file = h.trim().to_owned();
        } else if let Some(h) = line.strip_prefix("### ") {
            heading = format!("{file} {}", h.trim());
        } else if let Some(rest) = line.strip_prefix("| `") {
            let key = rest.split('`').next().unwrap().to_owned();
            assert!(
                !heading.is_empty(),
                "{key}: a key row outside a table heading"
            );
            tables.entry(heading.clone()).or_default().push(key);
        }
    }
    tables
}

#[test]
fn reference_documents_every_key_under_its_table_and_no_other() {
    use bento::protocol::settings::SettingsLayer;
    use bento::server::fleet as f;
    let with = |own: &[&str], settings: &[&str]| -> Vec<String> {
        own.iter().chain(settings).map(|k| k.to_string()).collect()
    };
    let expected: Vec<(&str, Vec<String>)> = vec![
        ("bento.toml [server]", with(&f::SERVER_KEYS, &[])),
        (
            "bento.toml [defaults]",
            with(&SettingsLayer::KEYS, &f::DEFAULTS_KEYS),
        ),
        (
            "bento.toml [hosts.NAME]",
            with(&f::HOST_KEYS, &SettingsLayer::KEYS),
        ),
        ("bento.toml [rollout]", with(&f::ROLLOUT_KEYS, &[])),
        ("bento.toml [secrets]", with(&f::secrets::SECRETS_KEYS, &[])),
        (
            "files.toml [\"PATH\"]",
            with(&bento::server::hostfiles::FILE_KEYS, &[]),
        ),
        (
            "agent.toml agent.toml",
            with(
                &bento::agent::config::MACHINE_KEYS,
                &SettingsLayer::AGENT_KEYS,
            ),
        ),
    ];
    let tables = reference_tables();
    // Every table of bento.toml has its heading.
    for t in f::FLEET_TABLES {
        let name = if t == "hosts" {
            "hosts.NAME".to_owned()
        } else {
            t.to_owned()
        };
        assert!(
            tables.contains_key(&format!("bento.toml [{name}]")),
            "docs/reference.md has no ### [{name}] table"
        );
    }
    for (heading, keys) in &expected {
        let documented = tables
            .get(*heading)
            .unwrap_or_else(|| panic!("docs/reference.md has no table {heading}"));
        for k in keys {
            assert!(
                documented.contains(k),
                "docs/reference.md: {heading} does not document `{k}`"
            );
        }
        for k in documented {
            assert!(
                keys.contains(k),
                "docs/reference.md: {heading} documents `{k}`, which the code does not know"
            );
        }
        let mut sorted = documented.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), documented.len(), "{heading}: a key twice");
    }
    let known: Vec<&str> = expected.iter().map(|(h, _)| *h).collect();
    for heading in tables.keys() {
        assert!(
            known.contains(&heading.as_str()),
            "docs/reference.md: table {heading} is not checked against the code"
        );
    }
}

/// Shell words of one command (single and double quotes; no expansion).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut in_word = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Every `bento …` command in the README's `sh` blocks is one the command line accepts, as
/// written (the quick start cannot name a command, flag or argument that does not exist).
#[test]
fn every_bento_command_in_the_readme_parses() {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut checked = 0;
    for block in readme.split("```sh\n").skip(1) {
        let block = &block[..block.find("```").unwrap()];
        for line in block.lines() {
            // A comment ends the command; `&&`, `|`, `;` and redirections separate commands.
            let line = line.split(" #").next().unwrap().trim();
            for part in line.split("&&").flat_map(|p| p.split(['|', ';'])) {
                let part = part.split(['>', '<']).next().unwrap().trim();
                if !part.starts_with("bento ") {
                    continue;
                }
                let words = shell_words(part);
                let parsed = bento::cli::Cli::command()
                    .try_get_matches_from(&words)
                    .and_then(|m| bento::cli::Cli::from_arg_matches(&m));
                assert!(parsed.is_ok(), "README: `{part}`: {}", parsed.unwrap_err());
                checked += 1;
            }
        }
    }
    assert!(checked >= 9, "only {checked} commands found in README.md");
}
