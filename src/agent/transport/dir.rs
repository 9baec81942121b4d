//! `file://` transport: the host's chroot as a local (or mounted) directory.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{finish_object, partial_name, Transport, TransportError};
use crate::protocol::layout::{CURRENT, LOGS, OBJECTS};
use crate::protocol::manifest::Digest;

pub struct DirTransport {
    root: PathBuf,
}

impl DirTransport {
    pub fn open(root: &Path) -> Result<Self, TransportError> {
        if !root.is_dir() {
            return Err(TransportError::Connect {
                server: format!("file://{}", root.display()),
                message: "not a directory".into(),
            });
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    fn remote(&self, path: &str, e: std::io::Error) -> TransportError {
        TransportError::Remote {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }
}

impl Transport for DirTransport {
    fn read_current(&mut self) -> Result<Option<String>, TransportError> {
        match fs::read(self.root.join(CURRENT)) {
            Ok(b) if b.len() <= 4096 => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
            Ok(_) => Err(TransportError::TooLarge {
                path: CURRENT.into(),
                limit: 4096,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.remote(CURRENT, e)),
        }
    }

    fn read_small(&mut self, path: &str, limit: u64) -> Result<Vec<u8>, TransportError> {
        let f = fs::File::open(self.root.join(path)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TransportError::NotFound {
                path: path.to_owned(),
            },
            _ => self.remote(path, e),
        })?;
        let mut buf = Vec::new();
        f.take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(|e| self.remote(path, e))?;
        if buf.len() as u64 > limit {
            return Err(TransportError::TooLarge {
                path: path.to_owned(),
                limit,
            });
        }
        Ok(buf)
    }

    fn fetch_objects(
        &mut self,
        objects: &[(Digest, u64)],
        dest_dir: &Path,
    ) -> Result<u64, TransportError> {
        let mut fetched = 0;
        for (digest, size) in objects {
            let rel = format!("{OBJECTS}/{digest}");
            let partial = dest_dir.join(partial_name(digest));
            let local = |source| TransportError::Local {
                path: partial.clone(),
                source,
            };
            let mut out = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&partial)
                .map_err(local)?;
            let have = out.metadata().map_err(local)?.len();
            let mut src = fs::File::open(self.root.join(&rel)).map_err(|e| self.remote(&rel, e))?;
            src.seek(SeekFrom::Start(have))
                .map_err(|e| self.remote(&rel, e))?;
            // Never read more than the manifest promised: a bigger object is a bad one.
            let n = std::io::copy(&mut src.take(size.saturating_sub(have) + 1), &mut out)
                .map_err(local)?;
            out.flush().map_err(local)?;
            out.sync_all().map_err(local)?;
            fetched += n;
            finish_object(dest_dir, digest)?;
        }
        Ok(fetched)
    }

    fn write_log(&mut self, path: &str, bytes: &[u8]) -> Result<(), TransportError> {
        let target = self.root.join(LOGS).join(path);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(|e| self.remote(path, e))?;
        }
        crate::sys::atomic::write_file(&target, bytes, 0o640).map_err(|e| self.remote(path, e))
    }

    fn close(self: Box<Self>) -> Result<(), TransportError> {
        Ok(())
    }
}
