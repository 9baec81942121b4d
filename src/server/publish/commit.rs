//! Which commit of the fleet repo a publish comes from, and whether its work tree holds
//! changes that commit does not (a manifest says `dirty`, and the operator is warned).

use std::path::Path;

/// What the fleet repo's work tree is, when it is a git work tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// `HEAD`.
    pub id: String,
    /// The work tree (under the fleet root) has changes or untracked files `HEAD` does not
    /// hold: what is published is not exactly `id`.
    pub dirty: bool,
}

/// The fleet repo's `HEAD` commit and whether the work tree differs from it.
pub fn source_commit(root: &Path) -> Option<Commit> {
    let git = |args: &[&str]| {
        crate::sys::process::Cmd::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .timeout(std::time::Duration::from_secs(60))
            .run()
            .ok()
            .map(|out| out.stdout_text())
    };
    let id = git(&["rev-parse", "--verify", "--quiet", "HEAD"])?
        .trim()
        .to_owned();
    if id.is_empty() {
        return None;
    }
    // Only the fleet root's subtree: the fleet may be one directory of a larger repo.
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=normal",
        "--",
        ".",
    ])
    .is_some_and(|text| !text.trim().is_empty());
    Some(Commit { id, dirty })
}

/// What a publish from a dirty work tree tells each host it published.
pub fn dirty_warning(commit: &Commit) -> String {
    format!(
        "published from a work tree with uncommitted changes: the manifest says source_commit {} with dirty = true; commit, then publish, for versions that are commits",
        &commit.id[..commit.id.len().min(12)]
    )
}
