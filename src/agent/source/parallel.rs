//! Requests of one batch run side by side over a backend whose requests are independent
//! (HTTP: an object store, a static mirror).
//!
//! Invariant: at most [`PARALLEL_FETCHES`] requests are in flight; results come back in the
//! order of the items; after a failure no new request starts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{RemoteError, PARALLEL_FETCHES};

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
