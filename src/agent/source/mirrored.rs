//! The sources one run reached, behind one [`Connection`]: the chosen one (whose `current`
//! the run follows) is asked first for everything; an item it lacks or fails to serve is
//! asked of the others in agent.toml's order, since every byte is verified against the
//! signed manifest whatever its origin. Reports go to the server only (or, beside a
//! read-only `https://` server, to agent.toml's `reports`).
//!
//! Invariants: `current` comes from the chosen source alone (which version to apply is
//! `agent::choose`'s decision, never a side effect of a fallback); a resumed download
//! continues from the bytes already on disk whichever source sent them; nothing is written
//! anywhere but the `server` of agent.toml (or its `reports`), and only when this run
//! reached it.

use super::{Connection, Item, LogItem, ObjectPart, RemoteError, ServerUrl, Sink, Source};

/// One source a run reached.
pub struct Reached {
    pub url: ServerUrl,
    pub conn: Box<dyn Connection>,
}

pub struct Mirrored {
    /// In agent.toml's order (`server` first when it was reached).
    all: Vec<Reached>,
    /// Index into `all` of the source the run follows.
    chosen: usize,
    /// Index into `all` of the `server`, when reached and writable.
    sink: Option<usize>,
    /// agent.toml's `server`, for the note when it was not reached.
    server: ServerUrl,
    /// A read-only server's `reports` place, when this run reached it.
    reports: Option<Reached>,
    /// That place when it was not reached, for the note.
    reports_missed: Option<ServerUrl>,
}

impl Mirrored {
    /// `all` in agent.toml's order; `chosen` indexes it; `server` is agent.toml's.
    pub fn new(all: Vec<Reached>, chosen: usize, server: &ServerUrl) -> Self {
        assert!(
            chosen < all.len(),
            "the chosen source is one of those reached"
        );
        let sink = all
            .iter()
            .position(|r| &r.url == server && r.url.takes_reports());
        Mirrored {
            all,
            chosen,
            sink,
            server: server.clone(),
            reports: None,
            reports_missed: None,
        }
    }

    /// Where reports go when `server` takes none (agent.toml's `reports` beside an
    /// `https://` server): the connection when reached, else its URL for the note.
    pub fn with_reports(mut self, url: ServerUrl, conn: Option<Box<dyn Connection>>) -> Self {
        match conn {
            Some(conn) => self.reports = Some(Reached { url, conn }),
            None => self.reports_missed = Some(url),
        }
        self
    }

    /// The source the run follows.
    pub fn chosen(&self) -> &ServerUrl {
        &self.all[self.chosen].url
    }

    /// The sources in the order they are asked: the chosen one, then the others.
    fn order(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::once(self.chosen).chain((0..self.all.len()).filter(|i| *i != self.chosen))
    }

    /// `f` on each source in order until one succeeds (or fails in a way another source
    /// cannot mend); the first source's error when none does.
    fn first<T>(
        &mut self,
        item: Item,
        mut f: impl FnMut(&mut dyn Connection) -> Result<Option<T>, RemoteError>,
    ) -> Result<Option<T>, RemoteError> {
        let order: Vec<usize> = if item == Item::Current {
            vec![self.chosen]
        } else {
            self.order().collect()
        };
        let mut first_err = None;
        for i in order {
            match f(self.all[i].conn.as_mut()) {
                Ok(Some(v)) => return Ok(Some(v)),
                Ok(None) => {}
                Err(e) if e.may_try_elsewhere() => {
                    tracing::debug!("{}: {e}; asking the next source", self.all[i].url);
                    first_err.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }
}

/// The part still to fetch after a source stopped midway: from what is on disk now.
fn remaining(part: &ObjectPart) -> Result<Option<ObjectPart>, RemoteError> {
    let have = match std::fs::metadata(&part.dest) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(source) => {
            return Err(RemoteError::Local {
                path: part.dest.clone(),
                source,
            })
        }
    };
    let end = part.from + part.max;
    Ok((have < end).then(|| ObjectPart {
        item: part.item,
        from: have,
        max: end - have,
        dest: part.dest.clone(),
    }))
}

impl Source for Mirrored {
    fn size(&mut self, item: Item) -> Result<Option<u64>, RemoteError> {
        self.first(item, |c| c.size(item))
    }

    fn read(&mut self, item: Item, limit: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        self.first(item, |c| c.read(item, limit))
    }

    fn read_objects(&mut self, parts: &[ObjectPart]) -> Result<u64, RemoteError> {
        let order: Vec<usize> = self.order().collect();
        let mut todo = parts.to_vec();
        let mut fetched = 0;
        let mut first_err = None;
        for i in order {
            if todo.is_empty() {
                break;
            }
            match self.all[i].conn.read_objects(&todo) {
                Ok(n) => return Ok(fetched + n),
                Err(e) if e.may_try_elsewhere() => {
                    tracing::debug!("{}: {e}; asking the next source", self.all[i].url);
                    first_err.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
            let mut left = Vec::new();
            for p in &todo {
                match remaining(p)? {
                    Some(r) => {
                        fetched += r.from.saturating_sub(p.from);
                        left.push(r);
                    }
                    None => fetched += p.max,
                }
            }
            todo = left;
        }
        match first_err {
            Some(e) if !todo.is_empty() => Err(e),
            _ => Ok(fetched),
        }
    }

    fn read_many(
        &mut self,
        items: &[Item],
        limit: u64,
    ) -> Result<Vec<Option<Vec<u8>>>, RemoteError> {
        let chosen = self.chosen;
        let mut got = match self.all[chosen].conn.read_many(items, limit) {
            Ok(got) => got,
            Err(e) if e.may_try_elsewhere() && self.all.len() > 1 => vec![None; items.len()],
            Err(e) => return Err(e),
        };
        if self.all.len() > 1 {
            for (item, slot) in items.iter().zip(got.iter_mut()) {
                if slot.is_none() {
                    *slot = self.read(*item, limit)?;
                }
            }
        }
        Ok(got)
    }

    fn size_many(&mut self, items: &[Item]) -> Result<Vec<Option<u64>>, RemoteError> {
        let chosen = self.chosen;
        let mut got = match self.all[chosen].conn.size_many(items) {
            Ok(got) => got,
            Err(e) if e.may_try_elsewhere() && self.all.len() > 1 => vec![None; items.len()],
            Err(e) => return Err(e),
        };
        if self.all.len() > 1 {
            for (item, slot) in items.iter().zip(got.iter_mut()) {
                if slot.is_none() {
                    *slot = self.size(*item)?;
                }
            }
        }
        Ok(got)
    }
}

impl Sink for Mirrored {
    fn put(&mut self, item: LogItem<'_>, bytes: &[u8]) -> Result<(), RemoteError> {
        if let Some(r) = &mut self.reports {
            return r.conn.put(item, bytes);
        }
        if let Some(url) = &self.reports_missed {
            return Err(RemoteError::NoSink {
                server: url.to_string(),
            });
        }
        match self.sink {
            Some(i) => self.all[i].conn.put(item, bytes),
            None if !self.server.takes_reports() => Err(RemoteError::ReadOnly {
                server: self.server.to_string(),
            }),
            None => Err(RemoteError::NoSink {
                server: self.server.to_string(),
            }),
        }
    }

    /// The reports' own connection's correction, else the followed source's: the requests
    /// this run signed went there.
    fn clock_correction(&self) -> Option<i64> {
        self.reports
            .as_ref()
            .and_then(|r| r.conn.clock_correction())
            .or_else(|| self.all[self.chosen].conn.clock_correction())
    }
}

impl Connection for Mirrored {
    fn close(self: Box<Self>) -> Result<(), RemoteError> {
        let mut result = Ok(());
        for r in self.all.into_iter().chain(self.reports) {
            if let Err(e) = r.conn.close() {
                result = result.and(Err(e));
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::super::DirConnection;
    use super::*;
    use crate::protocol::layout;
    use crate::protocol::manifest::Digest;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for d in [layout::MANIFESTS, layout::OBJECTS, layout::LOGS] {
            std::fs::create_dir(t.path().join(d)).unwrap();
        }
        t
    }

    fn reached(t: &tempfile::TempDir) -> Reached {
        Reached {
            url: ServerUrl::Dir(t.path().to_owned()),
            conn: Box::new(DirConnection::open(t.path()).unwrap()),
        }
    }

    #[test]
    fn objects_come_from_any_source_current_only_from_the_chosen_one() {
        let (a, b) = (tree(), tree());
        let body = b"only the mirror has it".to_vec();
        let d = Digest::of(&body);
        std::fs::write(layout::object(b.path(), &d), &body).unwrap();
        std::fs::write(layout::current(b.path()), "b\n").unwrap();
        let server = ServerUrl::Dir(a.path().to_owned());
        let mut m = Mirrored::new(vec![reached(&a), reached(&b)], 0, &server);
        assert_eq!(m.read(Item::Object(d), 1024).unwrap(), Some(body.clone()));
        assert_eq!(m.size(Item::Object(d)).unwrap(), Some(body.len() as u64));
        assert_eq!(m.read(Item::Current, 1024).unwrap(), None, "not b's");
        let got = m
            .read_many(&[Item::Object(d), Item::Object(Digest::of(b"x"))], 1024)
            .unwrap();
        assert_eq!(got, [Some(body.clone()), None]);

        // A download the chosen source cannot serve comes whole from the next one.
        let cache = tempfile::tempdir().unwrap();
        let dest = cache.path().join("partial");
        let part = ObjectPart {
            item: Item::Object(d),
            from: 0,
            max: body.len() as u64 + 1,
            dest: dest.clone(),
        };
        assert_eq!(m.read_objects(&[part]).unwrap(), body.len() as u64);
        assert_eq!(std::fs::read(&dest).unwrap(), body);

        // Reports go to the server when reached, and nowhere else.
        m.put(LogItem::Heartbeat, b"{}").unwrap();
        assert!(a.path().join("logs/heartbeat.json").exists());
        assert!(!b.path().join("logs/heartbeat.json").exists());
        let mut only_b = Mirrored::new(vec![reached(&b)], 0, &server);
        let err = only_b.put(LogItem::Heartbeat, b"{}").unwrap_err();
        assert!(matches!(err, RemoteError::NoSink { .. }), "{err}");
        assert!(!b.path().join("logs/heartbeat.json").exists());
    }
}
