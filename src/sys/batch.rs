//! Many crash-safe file updates made durable together. Each file is first written whole
//! under a temporary name, unsynced; [`Batch::commit`] syncs the filesystems once, only then
//! gives the files their names (renames and hard links: no data), and syncs again. A name
//! therefore never holds bytes that a crash could lose, as with an fsync per file, for two
//! `syncfs` calls instead of two fsyncs per file and directory. A small batch fsyncs its own
//! files and directories instead (a `syncfs` waits for every program's writes).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What [`Batch::commit`] does once the data is durable, in the order it was asked for.
#[derive(Debug)]
enum Place {
    /// Renames a temporary file over its target; with `spare`, the file it replaces is kept
    /// there, not freed (`atomic::replace_keeping`).
    Rename {
        tmp: PathBuf,
        target: PathBuf,
        spare: Option<PathBuf>,
    },
    /// A file written under a temporary name that a later step renames, or one appended to
    /// in place: only made durable.
    Kept { path: PathBuf },
    /// Hard-links `from` as `to` unless `to` is there already (it then holds the same
    /// bytes: names are digests), then removes `from` if it was a temporary file.
    Link {
        from: PathBuf,
        to: PathBuf,
        temporary: bool,
    },
}

/// What waits, in the order asked for, where each renamed target is in it, and which
/// files written in place it syncs.
#[derive(Debug, Default)]
struct Queue {
    places: Vec<Place>,
    renames: std::collections::HashMap<PathBuf, usize>,
    synced: std::collections::HashSet<PathBuf>,
}

/// Updates waiting for one [`Batch::commit`]. Shared by the threads that queue them.
#[derive(Debug)]
pub struct Batch {
    /// Directories whose filesystems a commit syncs: every file of the batch is on one.
    dirs: Vec<PathBuf>,
    queue: Mutex<Queue>,
    /// Held through a commit: a commit that finds the queue empty because another is
    /// placing it still returns only once that one is done.
    committing: Mutex<()>,
}

/// A commit failed: `at` could not be placed (or a filesystem not synced). Whatever was
/// placed holds durable bytes; some of the batch was not placed.
#[derive(Debug, thiserror::Error)]
#[error("{at}: {source}")]
pub struct CommitError {
    pub at: PathBuf,
    pub source: io::Error,
}

impl Batch {
    /// A batch of files on the filesystems of `dirs` (which its commits sync).
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        Self {
            dirs,
            queue: Mutex::default(),
            committing: Mutex::new(()),
        }
    }

    /// Writes `bytes` beside `target` under a temporary name, unsynced, to be renamed over
    /// `target` by the commit.
    /// A later write of the same target in the batch replaces this one, as it would
    /// have replaced the file.
    pub fn write(&self, target: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
        let tmp = crate::sys::atomic::write_temp_unsynced(target, bytes, mode)?;
        self.rename_later(tmp, target, None);
        Ok(())
    }

    /// [`Batch::write`] into the inode of `spare`, a file retired under that name, when
    /// there is one (`atomic::write_temp_reusing`); the file it replaces becomes the spare
    /// in turn. A file rewritten on every run (a stamp renewed) or replaced by a new one
    /// and retired (a manifest pushed out) costs no inode made nor freed.
    pub fn write_reusing(
        &self,
        target: &Path,
        spare: &Path,
        bytes: &[u8],
        mode: u32,
    ) -> io::Result<()> {
        let tmp = crate::sys::atomic::write_temp_reusing(target, spare, bytes, mode)?;
        self.rename_later(tmp, target, Some(spare.to_owned()));
        Ok(())
    }

    fn rename_later(&self, tmp: PathBuf, target: &Path, spare: Option<PathBuf>) {
        let mut queue = self.queue.lock().expect("batch lock");
        let Queue {
            places, renames, ..
        } = &mut *queue;
        match renames.get(target) {
            Some(&i) => {
                if let Place::Rename { tmp: earlier, .. } = &mut places[i] {
                    let _ = fs::remove_file(&*earlier);
                    *earlier = tmp;
                }
            }
            None => {
                renames.insert(target.to_owned(), places.len());
                places.push(Place::Rename {
                    tmp,
                    target: target.to_owned(),
                    spare,
                });
            }
        }
    }

    /// Writes the new file `path`, unsynced, to be made durable (and not renamed) by the
    /// commit: for a file whose name is temporary already, renamed by a later step.
    pub fn write_kept(&self, path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
        crate::sys::atomic::write_new_unsynced(path, bytes, mode)?;
        self.push(Place::Kept {
            path: path.to_owned(),
        });
        Ok(())
    }

    /// [`Batch::write_kept`] into the inode of `spare`, a file retired under that name, when
    /// there is one (`atomic::write_new_reusing`).
    pub fn write_kept_reusing(
        &self,
        path: &Path,
        spare: &Path,
        bytes: &[u8],
        mode: u32,
    ) -> io::Result<()> {
        crate::sys::atomic::write_new_reusing(path, spare, bytes, mode)?;
        self.push(Place::Kept {
            path: path.to_owned(),
        });
        Ok(())
    }

    /// Makes `path`, a file the caller wrote in place (an append), durable with the commit,
    /// however many times it is asked in one batch.
    pub fn sync(&self, path: &Path) {
        let mut queue = self.queue.lock().expect("batch lock");
        if queue.synced.insert(path.to_owned()) {
            queue.places.push(Place::Kept {
                path: path.to_owned(),
            });
        }
    }

    /// Queues a hard link of `from` as `to`; `temporary`: `from` is a temporary file the
    /// caller wrote for this batch, removed once linked.
    pub fn link(&self, from: PathBuf, to: PathBuf, temporary: bool) {
        self.push(Place::Link {
            from,
            to,
            temporary,
        });
    }

    fn push(&self, place: Place) {
        self.queue.lock().expect("batch lock").places.push(place);
    }

    /// Whether updates are waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.lock().expect("batch lock").places.is_empty()
    }

    /// Syncs, places every queued file under its name, and syncs again: links of
    /// temporary files first (what other names link to), then the rest, each pass spread
    /// over the calling thread pool (one file's placing never waits on another's). On an
    /// error the rest stays unplaced (their temporary files are left for the next run's
    /// clean-up) and the error names the path.
    pub fn commit(&self) -> Result<usize, CommitError> {
        use rayon::prelude::*;
        let _one_at_a_time = self.committing.lock().expect("commit lock");
        let queue = std::mem::take(&mut *self.queue.lock().expect("batch lock")).places;
        // A small batch syncs its own files: a `syncfs` also waits for every other
        // program's writes to the filesystem, which costs a small publish on a busy server
        // more than it saves.
        let small = queue.len() < SYNCFS_FROM;
        match small {
            true => queue.par_iter().try_for_each(sync_data)?,
            false => sync_filesystems(&self.dirs)?,
        }
        let (first, then): (Vec<&Place>, Vec<&Place>) = queue.iter().partition(|p| {
            matches!(
                p,
                Place::Link {
                    temporary: true,
                    ..
                }
            )
        });
        first.par_iter().try_for_each(|p| place(p))?;
        then.par_iter().try_for_each(|p| place(p))?;
        match small {
            true => {
                let mut parents: Vec<&Path> = queue
                    .iter()
                    .filter_map(|p| match p {
                        Place::Rename { target, .. } => target.parent(),
                        Place::Kept { path } => path.parent(),
                        Place::Link { to, .. } => to.parent(),
                    })
                    .collect();
                parents.sort();
                parents.dedup();
                parents.par_iter().try_for_each(|dir| {
                    crate::sys::atomic::sync_dir(dir).map_err(|source| CommitError {
                        at: dir.to_path_buf(),
                        source,
                    })
                })?
            }
            false => sync_filesystems(&self.dirs)?,
        }
        Ok(queue.len())
    }
}

/// Below this many files a commit fsyncs each file and directory of the batch instead of
/// syncing whole filesystems.
const SYNCFS_FROM: usize = 64;

/// fsync of the bytes a place gives a name (a link from a durable name has none).
fn sync_data(place: &Place) -> Result<(), CommitError> {
    let file = match place {
        Place::Rename { tmp, .. } => tmp,
        Place::Kept { path } => path,
        Place::Link {
            from,
            temporary: true,
            ..
        } => from,
        Place::Link { .. } => return Ok(()),
    };
    fs::File::open(file)
        .and_then(|f| f.sync_all())
        .map_err(|source| CommitError {
            at: file.clone(),
            source,
        })
}

fn place(place: &Place) -> Result<(), CommitError> {
    match place {
        Place::Kept { .. } => Ok(()),
        Place::Rename { tmp, target, spare } => match spare {
            Some(spare) => crate::sys::atomic::replace_keeping(tmp, target, spare),
            None => fs::rename(tmp, target),
        }
        .map_err(|source| CommitError {
            at: target.clone(),
            source,
        }),
        Place::Link {
            from,
            to,
            temporary,
        } => {
            match fs::hard_link(from, to) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(CommitError {
                        at: to.clone(),
                        source,
                    })
                }
            }
            if *temporary {
                let _ = fs::remove_file(from);
            }
            Ok(())
        }
    }
}

/// `syncfs` of the filesystem of each of `dirs`, once per filesystem.
fn sync_filesystems(dirs: &[PathBuf]) -> Result<(), CommitError> {
    let mut done: Vec<u64> = Vec::new();
    for dir in dirs {
        let at = |source| CommitError {
            at: dir.clone(),
            source,
        };
        let file = match fs::File::open(dir) {
            Ok(f) => f,
            // A directory a failed host never made: nothing of it to sync.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(at(e)),
        };
        let dev = file.metadata().map_err(at)?.dev();
        if done.contains(&dev) {
            continue;
        }
        rustix::fs::syncfs(&file).map_err(|e| at(io::Error::from(e)))?;
        done.push(dev);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_has_its_name_before_the_commit_and_everything_after() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        fs::write(d.join("old"), "old bytes").unwrap();
        let batch = Batch::new(vec![d.to_owned()]);
        batch.write(&d.join("old"), b"new bytes", 0o644).unwrap();
        batch.write(&d.join("fresh"), b"fresh", 0o600).unwrap();
        fs::write(d.join(".tmp-shared"), "shared").unwrap();
        batch.link(d.join(".tmp-shared"), d.join("pooled"), true);
        batch.link(d.join("pooled"), d.join("linked"), false);
        // Readers still see the old bytes, and no new name.
        assert_eq!(fs::read_to_string(d.join("old")).unwrap(), "old bytes");
        assert!(!d.join("fresh").exists() && !d.join("pooled").exists());
        // The last write of a target is the one it gets.
        batch.write(&d.join("old"), b"newer bytes", 0o644).unwrap();
        assert!(!batch.is_empty());

        assert_eq!(batch.commit().unwrap(), 4);
        assert_eq!(fs::read_to_string(d.join("old")).unwrap(), "newer bytes");
        assert_eq!(fs::read_to_string(d.join("fresh")).unwrap(), "fresh");
        let mode = fs::metadata(d.join("fresh")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_to_string(d.join("linked")).unwrap(), "shared");
        assert_eq!(fs::metadata(d.join("linked")).unwrap().nlink(), 2);
        assert!(!d.join(".tmp-shared").exists(), "the temporary name went");
        // Nothing but the placed files (no temporary left).
        let mut names: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["fresh", "linked", "old", "pooled"]);
        assert!(batch.is_empty());
    }

    #[test]
    fn a_kept_file_is_written_under_its_own_name_and_left_there_by_the_commit() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let batch = Batch::new(vec![d.to_owned()]);
        // A leftover of a killed run under the same temporary name is replaced.
        fs::write(d.join(".tmp-next"), "torn").unwrap();
        batch
            .write_kept(&d.join(".tmp-next"), b"whole", 0o644)
            .unwrap();
        batch.write(&d.join("m"), b"manifest", 0o644).unwrap();
        assert_eq!(fs::read_to_string(d.join(".tmp-next")).unwrap(), "whole");
        assert_eq!(batch.commit().unwrap(), 2);
        assert_eq!(fs::read_to_string(d.join(".tmp-next")).unwrap(), "whole");
        assert_eq!(fs::read_to_string(d.join("m")).unwrap(), "manifest");
    }

    #[test]
    fn a_batch_big_enough_for_syncfs_places_everything_too() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let batch = Batch::new(vec![d.to_owned()]);
        for i in 0..SYNCFS_FROM * 2 {
            batch
                .write(&d.join(format!("f{i}")), i.to_string().as_bytes(), 0o644)
                .unwrap();
        }
        assert_eq!(batch.commit().unwrap(), SYNCFS_FROM * 2);
        for i in 0..SYNCFS_FROM * 2 {
            assert_eq!(
                fs::read_to_string(d.join(format!("f{i}"))).unwrap(),
                i.to_string()
            );
        }
        assert_eq!(
            fs::read_dir(d).unwrap().count(),
            SYNCFS_FROM * 2,
            "no temporary left"
        );
    }

    #[test]
    fn a_link_to_a_name_already_there_keeps_it_and_a_failed_place_is_named() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        fs::write(d.join("a"), "same").unwrap();
        fs::write(d.join("b"), "same").unwrap();
        let batch = Batch::new(vec![d.to_owned()]);
        batch.link(d.join("a"), d.join("b"), false);
        batch.link(d.join("missing"), d.join("c"), false);
        let err = batch.commit().unwrap_err();
        assert_eq!(err.at, d.join("c"));
        assert_eq!(fs::metadata(d.join("b")).unwrap().nlink(), 1, "b kept");
    }
}
