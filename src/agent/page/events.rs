//! `GET /events`: the latest run as server-sent events — a `run` event, one message per
//! progress line, then exactly one `result` event, after which the stream ends. Without any
//! run in this process, one `idle` event. Event ids (`<run>-start`, `<run>-<line>`,
//! `<run>-end`) let a reconnecting EventSource resume after the last line it saw.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;

use super::runs::{lock, Runs, Shared};

/// A comment line on an idle event stream, so a closed tab is noticed and proxies keep it open.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Where a stream is: which run, and the next line to send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Cursor {
    run: Option<u64>,
    next: usize,
}

/// `Last-Event-ID` as sent back by a reconnecting EventSource.
pub(super) fn parse_event_id(id: &str) -> Cursor {
    let Some((run, pos)) = id.split_once('-') else {
        return Cursor::default();
    };
    let Ok(run) = run.parse() else {
        return Cursor::default();
    };
    let next = match pos {
        "start" => 0,
        "end" => usize::MAX,
        n => match n.parse::<usize>() {
            Ok(i) => i.saturating_add(1),
            Err(_) => return Cursor::default(),
        },
    };
    Cursor {
        run: Some(run),
        next,
    }
}

fn sse(event: Option<&str>, id: &str, data: &str) -> String {
    let mut out = String::new();
    if let Some(e) = event {
        out.push_str(&format!("event: {e}\n"));
    }
    out.push_str(&format!("id: {id}\n"));
    // A line break inside `data` would end the field early: each line is a field of its own.
    for line in data.split('\n') {
        out.push_str(&format!("data: {}\n", line.trim_end_matches('\r')));
    }
    out.push('\n');
    out
}

/// The events a stream at `cursor` has not sent yet, and whether the stream is complete.
pub(super) fn next_events(runs: &Runs, cursor: &mut Cursor) -> (Vec<String>, bool) {
    let Some(run) = &runs.latest else {
        return (vec![sse(Some("idle"), "idle", "{}")], true);
    };
    let mut out = Vec::new();
    if cursor.run != Some(run.id) {
        // A new stream, or an id from an older run: this run from its beginning.
        *cursor = Cursor {
            run: Some(run.id),
            next: 0,
        };
        let started = humantime::format_rfc3339_seconds(run.started).to_string();
        let data = serde_json::json!({ "run": run.id, "started": started, "trigger": run.trigger })
            .to_string();
        out.push(sse(Some("run"), &format!("{}-start", run.id), &data));
    }
    for (i, line) in run.lines.iter().enumerate().skip(cursor.next) {
        out.push(sse(None, &format!("{}-{i}", run.id), line));
    }
    cursor.next = cursor.next.max(run.lines.len());
    if let Some(f) = &run.finished {
        let data = serde_json::to_string(f).expect("result serialises");
        out.push(sse(Some("result"), &format!("{}-end", run.id), &data));
        return (out, true);
    }
    (out, false)
}

type Chunk = Result<Frame<Bytes>, Infallible>;

/// The stream's body: events as they happen, a keep-alive comment when nothing does, and
/// the end after the result. Each wake-up reads `runs` under its lock, so a change made
/// between two reads is never lost (the watch marks it unseen until the next read).
pub(super) fn stream(
    shared: Arc<Shared>,
    last_event_id: Option<&str>,
) -> impl futures_util::Stream<Item = Chunk> + Send {
    struct Feed {
        shared: Arc<Shared>,
        changed: tokio::sync::watch::Receiver<u64>,
        cursor: Cursor,
        done: bool,
    }
    let changed = shared.changed.subscribe();
    let feed = Feed {
        shared,
        changed,
        cursor: last_event_id.map(parse_event_id).unwrap_or_default(),
        done: false,
    };
    futures_util::stream::unfold(feed, |mut feed| async move {
        if feed.done {
            return None;
        }
        let mut waited = false;
        loop {
            feed.changed.borrow_and_update();
            let (events, done) = next_events(&lock(&feed.shared.runs), &mut feed.cursor);
            if !events.is_empty() || done {
                feed.done = done;
                return Some((Ok(Frame::data(Bytes::from(events.concat()))), feed));
            }
            if waited {
                return Some((
                    Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n"))),
                    feed,
                ));
            }
            // An error means the sender is gone (the server is stopping): one more read ends it.
            let _ = tokio::time::timeout(KEEPALIVE, feed.changed.changed()).await;
            waited = true;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::runs::{FinalOutcome, Finished, Run, Trigger};
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn events_stream_a_run_then_its_result() {
        let mut runs = Runs::default();
        let mut cursor = Cursor::default();
        let (ev, done) = next_events(&runs, &mut cursor);
        assert!(done && ev[0].starts_with("event: idle\n"), "{ev:?}");

        runs.latest = Some(Run {
            id: 3,
            trigger: Trigger::Retry,
            started: UNIX_EPOCH,
            lines: vec!["applying version abc".into()],
            finished: None,
        });
        let mut cursor = Cursor::default();
        let (ev, done) = next_events(&runs, &mut cursor);
        assert!(!done);
        assert_eq!(ev.len(), 2);
        assert!(
            ev[0].starts_with("event: run\nid: 3-start\ndata: {"),
            "{}",
            ev[0]
        );
        assert!(ev[0].contains("\"trigger\":\"retry\""), "{}", ev[0]);
        assert_eq!(ev[1], "id: 3-0\ndata: applying version abc\n\n");
        assert!(next_events(&runs, &mut cursor).0.is_empty(), "nothing new");

        let run = runs.latest.as_mut().unwrap();
        run.lines.push("two\nlines".into());
        run.finished = Some(Finished::new(FinalOutcome::Updated, "Updated.".into(), 10));
        let (ev, done) = next_events(&runs, &mut cursor);
        assert!(done);
        assert_eq!(ev[0], "id: 3-1\ndata: two\ndata: lines\n\n");
        assert!(
            ev[1].starts_with("event: result\nid: 3-end\ndata: {\"outcome\":\"updated\""),
            "{}",
            ev[1]
        );

        // A reconnecting EventSource resumes after the last line it saw.
        let mut resumed = parse_event_id("3-0");
        let (ev, _) = next_events(&runs, &mut resumed);
        assert_eq!(ev.len(), 2, "{ev:?}");
        // An id from an older run starts the newest run from its beginning.
        let mut old = parse_event_id("2-5");
        assert_eq!(next_events(&runs, &mut old).0.len(), 4);
        assert_eq!(parse_event_id("junk"), Cursor::default());
        assert_eq!(
            parse_event_id(&format!("3-{}", usize::MAX)).next,
            usize::MAX,
            "no overflow"
        );
    }
}
