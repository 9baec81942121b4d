//! Plumbing both sides use: crash-safe file writes, user and group lookups, running other
//! programs, how results reach the terminal, the S3 client for object stores and the plain
//! HTTPS reader for static mirrors.

pub mod accounts;
pub mod atomic;
pub mod batch;
pub mod binary;
pub mod http;
pub mod output;
pub mod process;
pub mod s3;
pub mod stamp;
pub mod terminal;

/// Frees `value` on a thread of its own: a structure of many small allocations (every
/// host's plan, a fleet's scan) that nothing reads any more, so the caller goes on without
/// waiting for it (and a process that exits first leaves it to the kernel). Where no thread
/// can be made, it is freed here.
pub fn drop_aside<T: Send + 'static>(value: T) {
    // A failed spawn drops the closure, and the value with it, on this thread.
    let _ = std::thread::Builder::new()
        .name("bento-free".into())
        .spawn(move || drop(value));
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_value_dropped_aside_is_freed_not_leaked() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        super::drop_aside(tx);
        // The sender's drop is what disconnects the channel.
        let got = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(got, Err(std::sync::mpsc::RecvTimeoutError::Disconnected));
    }
}
