//! Where this run already stored each shared content (an object, a `cache/` file), so the
//! next host gets a server-side copy instead of the bytes again. Hosts are published in
//! parallel: until a content is stored one caller at a time places it, so the hosts that
//! share it wait for the first one's upload and copy it, rather than all sending it at
//! once; its copies then run side by side.
//!
//! Invariant: a content's remembered place is only ever one whose upload (or copy)
//! succeeded; a caller that failed leaves the slot as it found it, and the next caller
//! sends the bytes itself.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A bucket and a key that hold a content.
pub type Place = (String, String);

#[derive(Default)]
pub struct Copies {
    slots: Mutex<BTreeMap<String, Arc<Mutex<Option<Place>>>>>,
}

impl Copies {
    /// Runs `place` with where this run already stored `content` (`None` for the first
    /// caller, or when every earlier one failed). Until a place is known callers go one at
    /// a time (the others wait for the first upload); what a caller returns as the place it
    /// stored is remembered for the next ones, which then run at once.
    pub fn place<T, E>(
        &self,
        content: &str,
        place: impl FnOnce(Option<&Place>) -> Result<(T, Option<Place>), E>,
    ) -> Result<T, E> {
        let slot = self
            .slots
            .lock()
            .expect("not poisoned")
            .entry(content.to_owned())
            .or_default()
            .clone();
        // A caller that panicked held nothing half-remembered: the slot is still valid.
        let known = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(p) = known {
            // Copies of a content already stored run side by side: only its first upload
            // makes the others wait.
            return place(Some(&p)).map(|(out, _)| out);
        }
        let mut held = slot.lock().unwrap_or_else(|e| e.into_inner());
        let (out, stored) = place(held.as_ref())?;
        if let Some(p) = stored {
            held.get_or_insert(p);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn at(key: &str) -> Place {
        ("b".into(), key.into())
    }

    #[test]
    fn hosts_placing_one_content_at_once_send_it_once_and_copy_it() {
        let copies = Copies::default();
        let (sent, copied) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for host in 0..8 {
                let (copies, sent, copied) = (&copies, &sent, &copied);
                s.spawn(move || {
                    copies
                        .place("object:aa", |from| {
                            if from.is_some() {
                                copied.fetch_add(1, Ordering::SeqCst);
                                return Ok::<_, ()>(((), None));
                            }
                            // A slow upload: the others arrive while it is under way.
                            std::thread::sleep(std::time::Duration::from_millis(20));
                            sent.fetch_add(1, Ordering::SeqCst);
                            Ok(((), Some(at(&format!("h{host}/objects/aa")))))
                        })
                        .unwrap();
                });
            }
        });
        assert_eq!(sent.load(Ordering::SeqCst), 1);
        assert_eq!(copied.load(Ordering::SeqCst), 7);
    }

    #[test]
    fn copies_of_a_stored_content_do_not_wait_for_each_other() {
        let copies = Copies::default();
        copies
            .place("object:aa", |_| {
                Ok::<_, ()>(((), Some(at("alpha/objects/aa"))))
            })
            .unwrap();
        let (now, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                let (copies, now, most) = (&copies, &now, &most);
                s.spawn(move || {
                    copies
                        .place("object:aa", |from| {
                            assert!(from.is_some());
                            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(n, Ordering::SeqCst);
                            // A copy under way while the others arrive.
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            now.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, ()>(((), None))
                        })
                        .unwrap();
                });
            }
        });
        assert!(
            most.load(Ordering::SeqCst) > 1,
            "the copies ran one at a time"
        );
    }

    #[test]
    fn a_failed_upload_is_not_remembered_and_the_next_caller_sends_it() {
        let copies = Copies::default();
        let failed: Result<(), &str> = copies.place("object:aa", |from| {
            assert!(from.is_none());
            Err("engine said 500")
        });
        assert!(failed.is_err());
        let seen = copies
            .place("object:aa", |from| {
                Ok::<_, ()>((from.cloned(), Some(at("beta/objects/aa"))))
            })
            .unwrap();
        assert_eq!(seen, None, "nothing remembered from the failed upload");
        let seen = copies
            .place("object:aa", |from| Ok::<_, ()>((from.cloned(), None)))
            .unwrap();
        assert_eq!(seen, Some(at("beta/objects/aa")));
        // Another content has its own slot.
        let other = copies
            .place("object:bb", |from| Ok::<_, ()>((from.cloned(), None)))
            .unwrap();
        assert_eq!(other, None);
    }
}
