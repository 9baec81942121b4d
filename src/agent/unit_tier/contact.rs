//! What the agent keeps for `bento agent status` and tells the server beyond the update
//! itself: runs that could not reach the server, and whether it checks signatures.

use std::sync::{Arc, Mutex};

use super::Bed;
use crate::agent::{AgentError, RunResult};
use crate::protocol::report::Outcome;

/// The tracing output of `f`, as the agent's journal would show it.
fn journal<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // A callsite first reached by a test thread with no subscriber can cache "never
    // interested" while this thread's scoped subscriber is being set, and this thread then
    // misses the event. A global subscriber that wants INFO (and writes nowhere) keeps every
    // callsite's interest open; the scoped one below still takes this thread's events.
    static GLOBAL: std::sync::Once = std::sync::Once::new();
    GLOBAL.call_once(|| {
        let quiet = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let _ = tracing::subscriber::set_global_default(quiet);
    });
    let buf = Buf::default();
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

#[test]
fn agent_records_a_run_that_cannot_reach_the_server_until_one_does() {
    let bed = Bed::new("");
    bed.publish("one");
    assert_eq!(bed.run().exit_code(), RunResult::EXIT_UPDATED);
    let success = bed.state().last.clone().unwrap();
    assert_eq!(bed.state().unreachable, None);

    // The server goes away: each run fails before it attempts anything…
    bed.host.server_down.set(true);
    bed.later(900);
    let first = crate::agent::outcome::secs(bed.now.get());
    let err = bed.try_run(false).unwrap_err();
    assert!(matches!(err, AgentError::Remote(_)), "{err}");
    bed.later(900);
    bed.try_run(false).unwrap_err();
    // …and the state says so (time, count, error), not only the last success.
    let state = bed.state();
    let u = state
        .unreachable
        .expect("the failed connection is recorded");
    assert_eq!((u.since, u.at, u.runs), (first, first + 900, 2));
    assert!(u.error.contains("cannot connect to file://test"), "{u:?}");
    assert!(u.error.contains("unreachable"), "{u:?}");
    assert_eq!(
        state.last,
        Some(success),
        "the last attempt is still the last"
    );

    // The next run that reaches the server clears it.
    bed.host.server_down.set(false);
    bed.later(900);
    assert!(matches!(bed.run(), RunResult::NoOp { .. }));
    assert_eq!(bed.state().unreachable, None);
    assert_eq!(bed.heartbeat().last_outcome, Some(Outcome::Success));
}

#[test]
fn agent_without_trusted_keys_warns_on_every_run_and_its_heartbeat_says_so() {
    let bed = Bed::new("");
    // A run with nothing to do warns too, not only one that applies a version.
    let (r, log) = journal(|| bed.run());
    assert!(matches!(r, RunResult::NoOp { .. }), "{r:?}");
    assert_eq!(
        log.matches("WARN").count(),
        1,
        "one warning per run:\n{log}"
    );
    assert!(
        log.contains("no trusted_keys configured: manifest signatures are not verified"),
        "{log}"
    );
    assert_eq!(bed.heartbeat().verifies_signatures, Some(false));
    bed.publish("one");
    let (r, log) = journal(|| bed.run());
    assert_eq!(r.exit_code(), RunResult::EXIT_UPDATED);
    assert!(log.contains("signatures are not verified"), "{log}");
    assert_eq!(bed.heartbeat().verifies_signatures, Some(false));
}

#[test]
fn agent_with_trusted_keys_does_not_warn_and_its_heartbeat_says_it_verifies() {
    let bed = Bed::new(
        "trusted_keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHFSC/XxzabMcgDewCNaqV3Ig9tNzGTvvUJSjFIfzLTB fleet\"]\n",
    );
    let (r, log) = journal(|| bed.run());
    assert!(matches!(r, RunResult::NoOp { .. }), "{r:?}");
    assert!(!log.contains("trusted_keys"), "{log}");
    assert_eq!(bed.heartbeat().verifies_signatures, Some(true));
}
