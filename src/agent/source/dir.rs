//! `file://`: the host's chroot as a local (or mounted) directory, both source and sink.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{Connection, Item, LogItem, ObjectPart, RemoteError, Sink, Source};
use crate::protocol::layout::LOGS;

pub struct DirConnection {
    root: PathBuf,
}

impl DirConnection {
    pub fn open(root: &Path) -> Result<Self, RemoteError> {
        if !root.is_dir() {
            return Err(RemoteError::Connect {
                server: format!("file://{}", root.display()),
                message: "not a directory".into(),
            });
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }
}

fn remote(path: &str, e: std::io::Error) -> RemoteError {
    RemoteError::Remote {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

impl Source for DirConnection {
    fn size(&mut self, item: Item) -> Result<Option<u64>, RemoteError> {
        let rel = item.path();
        match fs::metadata(self.root.join(&rel)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(remote(&rel, e)),
        }
    }

    fn read(&mut self, item: Item, limit: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        let rel = item.path();
        let f = match fs::File::open(self.root.join(&rel)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(remote(&rel, e)),
        };
        let mut buf = Vec::new();
        f.take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(|e| remote(&rel, e))?;
        if buf.len() as u64 > limit {
            return Err(RemoteError::TooLarge { path: rel, limit });
        }
        Ok(Some(buf))
    }

    fn read_objects(&mut self, parts: &[ObjectPart]) -> Result<u64, RemoteError> {
        let mut fetched = 0;
        for part in parts {
            let rel = part.item.path();
            let local = |source| RemoteError::Local {
                path: part.dest.clone(),
                source,
            };
            let mut out = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&part.dest)
                .map_err(local)?;
            let mut src = fs::File::open(self.root.join(&rel)).map_err(|e| remote(&rel, e))?;
            src.seek(SeekFrom::Start(part.from))
                .map_err(|e| remote(&rel, e))?;
            fetched += std::io::copy(&mut src.take(part.max), &mut out).map_err(local)?;
            out.flush().map_err(local)?;
            out.sync_all().map_err(local)?;
        }
        Ok(fetched)
    }
}

impl Sink for DirConnection {
    fn put(&mut self, item: LogItem<'_>, bytes: &[u8]) -> Result<(), RemoteError> {
        let path = item.path();
        let target = self.root.join(LOGS).join(&path);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(|e| remote(&path, e))?;
        }
        crate::sys::atomic::write_file(&target, bytes, 0o640).map_err(|e| remote(&path, e))
    }
}

impl Connection for DirConnection {
    fn close(self: Box<Self>) -> Result<(), RemoteError> {
        Ok(())
    }
}
