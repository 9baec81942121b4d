//! Requests of one batch run side by side over a backend whose requests are independent
//! (HTTP: an object store, a static mirror).
//!
//! Invariant: at most [`PARALLEL_FETCHES`] requests are in flight; results come back in the
//! order of the items; after a failure no new request starts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{Item, ObjectPart, RemoteError, Source, PARALLEL_FETCHES};

/// A backend whose reads are independent requests (an object store, a static mirror): its
/// [`Source`] is these three reads, batches run [`parallel`].
pub(super) trait Requests: Sync {
    fn size_of(&self, item: Item) -> Result<Option<u64>, RemoteError>;
    fn read_item(&self, item: Item, limit: u64) -> Result<Option<Vec<u8>>, RemoteError>;
    /// Downloads (or resumes) one object part into its file; the bytes fetched.
    fn read_part(&self, part: &ObjectPart) -> Result<u64, RemoteError>;
}

impl<T: Requests> Source for T {
    fn size(&mut self, item: Item) -> Result<Option<u64>, RemoteError> {
        self.size_of(item)
    }

    fn read(&mut self, item: Item, limit: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        self.read_item(item, limit)
    }

    fn read_objects(&mut self, parts: &[ObjectPart]) -> Result<u64, RemoteError> {
        let this = &*self;
        Ok(parallel(parts, |p| this.read_part(p))?.iter().sum())
    }

    fn read_many(
        &mut self,
        items: &[Item],
        limit: u64,
    ) -> Result<Vec<Option<Vec<u8>>>, RemoteError> {
        let this = &*self;
        parallel(items, |i| this.read_item(*i, limit))
    }

    fn size_many(&mut self, items: &[Item]) -> Result<Vec<Option<u64>>, RemoteError> {
        let this = &*self;
        parallel(items, |i| this.size_of(*i))
    }
}

/// Runs `f` on every item, at most [`PARALLEL_FETCHES`] at once, results in order; the
/// first error is returned (the others are dropped: the run stops anyway).
pub(super) fn parallel<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R, RemoteError> + Sync,
) -> Result<Vec<R>, RemoteError> {
    if items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<R, RemoteError>>>> =
        Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL_FETCHES.min(items.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                let failed = r.is_err();
                results.lock().expect("results lock")[i] = Some(r);
                if failed {
                    // Stop handing out work; the others finish what they hold.
                    next.store(items.len(), Ordering::Relaxed);
                    break;
                }
            });
        }
    });
    let mut results = results.into_inner().expect("results lock");
    if let Some(i) = results.iter().position(|r| matches!(r, Some(Err(_)))) {
        if let Some(Err(e)) = results.swap_remove(i) {
            return Err(e);
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every item ran unless one failed"))
        .collect()
}
