//! The publisher's own records, kept outside the served tree where no host account can
//! write: the highest serial numbered per host (`serials.log`), rollback holds
//! (`holds/<host>.json`), the journal (`journal.jsonl`) and the system each host's
//! configuration evaluated to (`systems/<host>.json`). One function says where
//! they live ([`dir`]), so the place can move (an object-store fleet keeps them elsewhere)
//! without touching what reads and writes them. A serial record only ever grows.

mod holds;
mod journal;
mod serials;
mod systems;

use std::path::{Path, PathBuf};

pub use holds::{Hold, Holds};
pub use journal::{operator, rolled_back, Entry, Journal, JournalHost};
pub use serials::Serials;
pub use systems::{SystemRecord, Systems};

use crate::protocol::layout::Chroot;

/// Where the publisher keeps its records: today the chroot's root-only `.bento/`.
pub fn dir(chroot: &Chroot) -> PathBuf {
    chroot.state_dir()
}

/// Creates a records directory, root-only like the rest of the publisher's state.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}
