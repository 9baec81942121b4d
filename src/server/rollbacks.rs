//! Which versions `bento rollback` made live, per host, in the server's private state
//! (`<chroot>/.bento/rollbacks/<host>`, one digest a line), so `bento log` can tell a
//! rollback from a publish: a rollback's manifest is an earlier one's content and carries
//! no mark of its own (the protocol is unchanged).
//!
//! Invariant: the record is advisory; losing or failing to read it only makes a rollback
//! show as a publish, never fails a command, and it stays bounded (`MAX_KEPT` lines).

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use crate::protocol::layout::Chroot;
use crate::protocol::manifest::Digest;
use crate::protocol::HostName;

const DIR: &str = "rollbacks";
/// Versions remembered per host; far more than a host keeps (older ones are gone anyway).
const MAX_KEPT: usize = 200;

fn path(chroot: &Chroot, host: &HostName) -> PathBuf {
    chroot.state_dir().join(DIR).join(host.as_str())
}

/// The versions `bento rollback` made live on `host` (empty when none, or unreadable).
pub fn read(chroot: &Chroot, host: &HostName) -> BTreeSet<Digest> {
    std::fs::read_to_string(path(chroot, host))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Adds `version` to `host`'s record (atomically; the state directory is root-only).
pub fn record(chroot: &Chroot, host: &HostName, version: Digest) -> io::Result<()> {
    let dir = chroot.state_dir().join(DIR);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let file = path(chroot, host);
    let mut lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.push(version.to_hex());
    let skip = lines.len().saturating_sub(MAX_KEPT);
    let text: String = lines[skip..].iter().map(|l| format!("{l}\n")).collect();
    crate::sys::atomic::write_file(&file, text.as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_versions_are_read_back_and_bounded() {
        let t = tempfile::tempdir().unwrap();
        let chroot = Chroot::new(t.path().to_owned());
        std::fs::create_dir_all(chroot.state_dir()).unwrap();
        let host = HostName::new("alpha").unwrap();
        assert!(read(&chroot, &host).is_empty());
        let digests: Vec<Digest> = (0..MAX_KEPT + 5)
            .map(|i| Digest::of(i.to_string().as_bytes()))
            .collect();
        for d in &digests {
            record(&chroot, &host, *d).unwrap();
        }
        let kept = read(&chroot, &host);
        assert_eq!(kept.len(), MAX_KEPT);
        assert!(kept.contains(digests.last().unwrap()));
        assert!(!kept.contains(&digests[0]));
        assert!(read(&chroot, &HostName::new("beta").unwrap()).is_empty());
    }
}
