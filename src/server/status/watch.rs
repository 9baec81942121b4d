//! Waiting for the fleet to change (`bento status --watch`) with inotify, not polling: the
//! chroot root (new hosts), each host directory (`current` replaced by a publish), each
//! host's `logs/` (heartbeat and newest report) and the build records. Watches are added for
//! host directories that appear later.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};

use crate::protocol::layout::{Chroot, CURRENT, LOGS};
use crate::protocol::report::{HEARTBEAT_FILE, LATEST_FILE};
use crate::protocol::HostName;
use crate::server::build::record::{builds_dir, BUILDS_DIR};

/// Changes closer together than this give one redraw.
pub const SETTLE: Duration = Duration::from_millis(150);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Root,
    /// `.bento/`, where `builds/` appears with the first build.
    State,
    HostDir,
    Logs,
    Builds,
}

/// A running watch of one chroot.
pub struct Watcher {
    changes: Receiver<()>,
}

struct Registry {
    watches: Watches,
    roles: HashMap<WatchDescriptor, (Role, PathBuf)>,
    warned: bool,
}

impl Registry {
    fn add(&mut self, path: &Path, role: Role) {
        let mask = match role {
            Role::Root | Role::State => WatchMask::CREATE | WatchMask::MOVED_TO,
            Role::HostDir => WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::CLOSE_WRITE,
            Role::Logs | Role::Builds => {
                WatchMask::MOVED_TO | WatchMask::CLOSE_WRITE | WatchMask::DELETE
            }
        } | WatchMask::ONLYDIR
            | WatchMask::DONT_FOLLOW;
        match self.watches.add(path, mask) {
            Ok(wd) => {
                self.roles.insert(wd, (role, path.to_owned()));
            }
            // Not there (yet): a later CREATE in the parent adds it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                if !self.warned {
                    tracing::warn!(
                        "cannot watch {}: {e} (raise fs.inotify.max_user_watches); changes there show at the next redraw",
                        path.display()
                    );
                    self.warned = true;
                }
            }
        }
    }

    fn add_host(&mut self, dir: &Path) {
        self.add(dir, Role::HostDir);
        self.add(&dir.join(LOGS), Role::Logs);
    }

    /// Whether an event changes what status shows; adds watches for new directories.
    fn handle(&mut self, wd: &WatchDescriptor, mask: EventMask, name: Option<&OsStr>) -> bool {
        let Some((role, path)) = self.roles.get(wd).cloned() else {
            return false;
        };
        let name = name.and_then(OsStr::to_str).unwrap_or("");
        match role {
            Role::Root => {
                if HostName::new(name).is_ok() && mask.contains(EventMask::ISDIR) {
                    self.add_host(&path.join(name));
                    return true;
                }
                if name == crate::protocol::layout::STATE {
                    self.add(&path.join(name), Role::State);
                    self.add(&path.join(name).join(BUILDS_DIR), Role::Builds);
                }
                false
            }
            Role::State => {
                if name == BUILDS_DIR {
                    self.add(&path.join(name), Role::Builds);
                }
                false
            }
            Role::HostDir => {
                if name == LOGS && mask.contains(EventMask::ISDIR) {
                    self.add(&path.join(name), Role::Logs);
                    return true;
                }
                name == CURRENT
            }
            Role::Logs => name == HEARTBEAT_FILE || name == LATEST_FILE,
            Role::Builds => name.ends_with(".json"),
        }
    }
}

impl Watcher {
    /// Starts watching `chroot` (which must exist).
    pub fn start(chroot: &Chroot) -> std::io::Result<Self> {
        let mut inotify = Inotify::init()?;
        let mut reg = Registry {
            watches: inotify.watches(),
            roles: HashMap::new(),
            warned: false,
        };
        reg.add(&chroot.root, Role::Root);
        if !reg.roles.values().any(|(r, _)| *r == Role::Root) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("cannot watch {}", chroot.root.display()),
            ));
        }
        reg.add(&chroot.state_dir(), Role::State);
        reg.add(&builds_dir(chroot), Role::Builds);
        for entry in std::fs::read_dir(&chroot.root)? {
            let entry = entry?;
            let is_host = entry
                .file_name()
                .to_str()
                .is_some_and(|n| HostName::new(n).is_ok());
            if is_host && entry.file_type()?.is_dir() {
                reg.add_host(&entry.path());
            }
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("status-watch".into())
            .spawn(move || {
                let mut buffer = [0u8; 64 * 1024];
                loop {
                    let events = match inotify.read_events_blocking(&mut buffer) {
                        Ok(ev) => ev,
                        Err(e) => {
                            tracing::warn!("watching the chroot stopped: {e}");
                            return;
                        }
                    };
                    let mut changed = false;
                    for ev in events {
                        if ev.mask.contains(EventMask::Q_OVERFLOW) {
                            changed = true;
                            continue;
                        }
                        changed |= reg.handle(&ev.wd, ev.mask, ev.name);
                    }
                    if changed && tx.send(()).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self { changes: rx })
    }

    /// Waits up to `timeout` for a change. Returns true on a change (after letting a burst of
    /// changes settle), false on timeout.
    pub fn wait(&self, timeout: Duration) -> bool {
        match self.changes.recv_timeout(timeout) {
            Ok(()) => {
                // A busy fleet changes all the time: settle, but redraw at least every second.
                let deadline = std::time::Instant::now() + Duration::from_secs(1);
                while std::time::Instant::now() < deadline
                    && self.changes.recv_timeout(SETTLE).is_ok()
                {}
                true
            }
            Err(RecvTimeoutError::Timeout) => false,
            // The watching thread stopped (it logged why): fall back to redrawing on the timer.
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(timeout);
                false
            }
        }
    }
}
