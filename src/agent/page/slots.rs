//! Who holds the page's connections: requests (the page, `/state`, the Update and Retry
//! buttons) and `/events` streams are counted apart (issue #23 item 12). A request holds a
//! request slot only until it is answered (at most `REQUEST_DEADLINE` to arrive); an event
//! stream gives its request slot back and takes one of the fewer stream slots, for at most
//! [`STREAM_LIFETIME`]. So however many streams a local user opens, or how fast clients
//! reconnect, the page and its buttons keep their slots.
//!
//! Invariant: a slot is given back exactly once, when its [`Held`] is dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connections being read or answered at once; one more is answered 503 and closed.
pub(super) const MAX_REQUESTS: usize = 32;
/// `/events` streams open at once; one more is answered 503 (the page then follows the run
/// by reconnecting later). A person has a tab or two open: 16 is plenty.
pub(super) const MAX_STREAMS: usize = 16;
/// How long one event stream lasts; an EventSource reconnects by itself with
/// `Last-Event-ID` and resumes after the last line it saw, so this costs a reconnect, not a
/// line, and a stream nobody reads any more cannot hold its slot for the whole run.
pub(super) const STREAM_LIFETIME: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub(super) struct Slots {
    requests: AtomicUsize,
    streams: AtomicUsize,
}

/// Which count a [`Held`] slot is in.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Request,
    Stream,
}

/// One taken slot, given back on drop.
#[derive(Debug)]
pub(super) struct Held {
    slots: Arc<Slots>,
    kind: Kind,
}

impl Slots {
    fn counter(&self, kind: Kind) -> &AtomicUsize {
        match kind {
            Kind::Request => &self.requests,
            Kind::Stream => &self.streams,
        }
    }

    fn take(self: &Arc<Self>, kind: Kind, max: usize) -> Option<Held> {
        let counter = self.counter(kind);
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Held {
            slots: Arc::clone(self),
            kind,
        })
    }

    /// A request slot, `None` when all [`MAX_REQUESTS`] are taken.
    pub(super) fn request(self: &Arc<Self>) -> Option<Held> {
        self.take(Kind::Request, MAX_REQUESTS)
    }

    /// A stream slot, `None` when all [`MAX_STREAMS`] are taken.
    pub(super) fn stream(self: &Arc<Self>) -> Option<Held> {
        self.take(Kind::Stream, MAX_STREAMS)
    }

    /// Connections of either kind now (the idle exit waits for none).
    pub(super) fn in_use(&self) -> usize {
        self.requests.load(Ordering::SeqCst) + self.streams.load(Ordering::SeqCst)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.slots.counter(self.kind).fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_cannot_take_the_request_slots() {
        let slots = Arc::new(Slots::default());
        let streams: Vec<Held> = std::iter::from_fn(|| slots.stream()).collect();
        assert_eq!(streams.len(), MAX_STREAMS);
        let requests: Vec<Held> = std::iter::from_fn(|| slots.request()).collect();
        assert_eq!(requests.len(), MAX_REQUESTS, "streams took no request slot");
        assert_eq!(slots.in_use(), MAX_STREAMS + MAX_REQUESTS);
        drop(requests);
        assert!(slots.request().is_some());
        assert!(slots.stream().is_none(), "streams stay capped");
        drop(streams);
        assert_eq!(slots.in_use(), 0, "every slot given back once");
    }
}
