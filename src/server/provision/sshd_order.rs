//! Where bento's `Match Group <group>` block sits in sshd's configuration: sshd takes the
//! first value it reads for each keyword, so a `Match` block read before bento's that can
//! apply to the hosts' accounts wins over bento's for every keyword both set. This reads
//! sshd_config as sshd does (`Include` expanded in place, globs in order, relative paths
//! under /etc/ssh) and names every such block.

use std::fs;
use std::path::{Path, PathBuf};

/// One `Match` line, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MatchLine {
    file: PathBuf,
    line: usize,
    criteria: String,
}

/// sshd resolves a relative `Include` under its configuration directory.
const SSH_DIR: &str = "/etc/ssh";
/// Includes nested deeper than this are not followed (sshd's own limit is 16).
const MAX_DEPTH: usize = 16;

/// Every `Match` line of `config` and its includes, in the order sshd reads them.
fn match_lines(config: &Path, depth: usize, out: &mut Vec<MatchLine>) {
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(text) = fs::read_to_string(config) else {
        return;
    };
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, rest) = line
            .split_once(|c: char| c.is_whitespace() || c == '=')
            .unwrap_or((line, ""));
        let rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '=');
        if key.eq_ignore_ascii_case("match") {
            out.push(MatchLine {
                file: config.to_owned(),
                line: i + 1,
                criteria: rest.trim().to_owned(),
            });
        } else if key.eq_ignore_ascii_case("include") {
            for pattern in rest.split_whitespace() {
                let pattern = if pattern.starts_with('/') {
                    pattern.to_owned()
                } else {
                    format!("{SSH_DIR}/{pattern}")
                };
                let mut files: Vec<PathBuf> = glob::glob(&pattern)
                    .map(|paths| paths.flatten().collect())
                    .unwrap_or_default();
                files.sort();
                for file in files {
                    match_lines(&file, depth + 1, out);
                }
            }
        }
    }
}

/// Whether a `Match` with these criteria can apply to a host account (`<prefix><host>`, in
/// the fleet's `group` and its own group). Criteria are all required; what bento cannot rule
/// out (addresses, hosts, ports) counts as matching.
fn can_capture(criteria: &str, prefix: &str, group: &str) -> bool {
    let words: Vec<&str> = criteria.split_whitespace().collect();
    let mut i = 0;
    while i < words.len() {
        let key = words[i].to_ascii_lowercase();
        if key == "all" {
            return true;
        }
        let value = words.get(i + 1).copied().unwrap_or("");
        i += 2;
        let patterns: Vec<&str> = value.split(',').filter(|p| !p.starts_with('!')).collect();
        let possible = match key.as_str() {
            "user" => patterns
                .iter()
                .any(|p| p.contains(['*', '?']) || p.starts_with(prefix)),
            "group" => patterns
                .iter()
                .any(|p| p.contains(['*', '?']) || *p == group || p.starts_with(prefix)),
            _ => true,
        };
        if !possible {
            return false;
        }
    }
    true
}

fn is_bentos(criteria: &str, group: &str) -> bool {
    let words: Vec<&str> = criteria.split_whitespace().collect();
    words.len() == 2 && words[0].eq_ignore_ascii_case("group") && words[1] == group
}

/// Problems with the order of `Match` blocks in `config`: one for each block before bento's
/// that can apply to the hosts' accounts, and one when bento's block is not there at all.
pub fn earlier_matches(config: &Path, prefix: &str, group: &str) -> Vec<String> {
    let mut lines = Vec::new();
    match_lines(config, 0, &mut lines);
    let Some(bento) = lines.iter().position(|m| is_bentos(&m.criteria, group)) else {
        // `server check` reports the missing block per host, from sshd's effective settings.
        return Vec::new();
    };
    lines[..bento]
        .iter()
        .filter(|m| can_capture(&m.criteria, prefix, group))
        .map(|m| {
            format!(
                "{}:{}: `Match {}` comes before bento's `Match Group {group}` ({}:{}) and can apply to the hosts' accounts; sshd takes the first value of each keyword, so it wins where both set one: install bento's block as the first drop-in (`bento server sshd-config > /etc/ssh/sshd_config.d/00-bento.conf`)",
                m.file.display(),
                m.line,
                m.criteria,
                lines[bento].file.display(),
                lines[bento].line
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capturing_block_before_bentos_is_named_and_one_after_is_not() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("sshd_config.d");
        fs::create_dir(&d).unwrap();
        let main = t.path().join("sshd_config");
        fs::write(
            &main,
            format!(
                "Include {}/*.conf\nPort 22\nMatch User admin\n    X11Forwarding yes\n",
                d.display()
            ),
        )
        .unwrap();
        fs::write(
            d.join("10-sftp.conf"),
            "Match Group sftp,bento\n  ChrootDirectory /srv\n",
        )
        .unwrap();
        fs::write(
            d.join("20-bento.conf"),
            "Match Group bento\n  ChrootDirectory %h\n",
        )
        .unwrap();
        let problems = earlier_matches(&main, "bento-", "bento");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("10-sftp.conf:1"), "{}", problems[0]);
        assert!(problems[0].contains("00-bento.conf"), "{}", problems[0]);
        // First drop-in: nothing before it.
        fs::rename(d.join("20-bento.conf"), d.join("00-bento.conf")).unwrap();
        assert_eq!(
            earlier_matches(&main, "bento-", "bento"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn which_criteria_can_reach_a_host_account() {
        for yes in [
            "All",
            "Group bento",
            "User bento-*",
            "Address 10.0.0.0/8",
            "User *,!root",
        ] {
            assert!(can_capture(yes, "bento-", "bento"), "{yes}");
        }
        for no in [
            "User admin",
            "Group wheel",
            "User admin Address 10.0.0.0/8",
            "Group !bento",
            // Another fleet's block, before this one's.
            "Group fleet_b",
        ] {
            assert!(!can_capture(no, "bento-", "bento"), "{no}");
        }
        // A second fleet (group fleet_b): the first fleet's block before its own is harmless.
        assert!(!can_capture("Group bento", "b-", "fleet_b"));
        assert!(can_capture("Group sftp,fleet_b", "b-", "fleet_b"));
    }
}
