//! One connection: hyper speaks HTTP/1.1; this file keeps the checks that are bento's own.
//! - a total deadline for the request (head and body): a client that drips bytes is cut
//!   off after `REQUEST_DEADLINE` however steadily it sends, so slow connections cannot
//!   hold the 32 request slots; an event stream, once its request is in, trades its request
//!   slot for a stream slot (503 when none is free) and ends after `STREAM_LIFETIME`;
//! - head 8 KiB (hyper answers 431), body 1 KiB (413), 10 s per blocked write;
//! - `Host` must name this listener (421), or a DNS-rebinding page could read the state;
//! - nothing changes on a GET; `POST /update` only from the page's own origin (403).
//!
//! One request per connection (`Connection: close`): a page with two buttons and one event
//! stream needs no more, and a connection's slot is then freed as soon as it is answered.

use std::convert::Infallible;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, Limited, StreamBody};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::runs::{lock, Shared, Trigger};
use super::slots::{Held, Slots, STREAM_LIFETIME};
use super::{events, view};

/// Request line and headers together (hyper's smallest read buffer, which it enforces).
pub(super) const MAX_HEAD: usize = 8 * 1024;
/// `POST /update` carries at most `retry=1`; a small form body is all it accepts.
pub(super) const MAX_BODY: usize = 1024;
/// From accept to the last byte of the request body.
pub(super) const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long one write may stay blocked (a client that stopped reading its event stream).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection over the limit is told so, after at most this long reading its request.
const BUSY_DEADLINE: Duration = Duration::from_secs(1);

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What a connection is for: a normal visit holding a request slot (given back when it
/// becomes an event stream), or one over the limit.
pub(super) enum Slot {
    Open { held: Held, slots: Arc<Slots> },
    Busy,
}

/// Serves one connection until it is answered, cut off at its deadline, or closed.
pub(super) async fn connection(shared: Arc<Shared>, stream: TcpStream, slot: Slot) {
    let busy = matches!(slot, Slot::Busy);
    let deadline = Instant::now()
        + if busy {
            BUSY_DEADLINE
        } else {
            REQUEST_DEADLINE
        };
    // Set once hyper has the head; the body has the handler's own deadline (and a 408).
    let head_in = Arc::new(AtomicBool::new(false));
    // The request slot, until the request becomes an event stream (which gives it back).
    let slot = Arc::new(std::sync::Mutex::new(match slot {
        Slot::Open { held, slots } => Some((held, slots)),
        Slot::Busy => None,
    }));
    let service = {
        let head_in = Arc::clone(&head_in);
        hyper::service::service_fn(move |req| {
            head_in.store(true, Ordering::SeqCst);
            let shared = Arc::clone(&shared);
            let slot = Arc::clone(&slot);
            async move {
                Ok::<_, Infallible>(if busy {
                    text(StatusCode::SERVICE_UNAVAILABLE, "too many connections")
                } else {
                    route(&shared, req, deadline, &slot).await
                })
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(MAX_HEAD)
        // Header names as browsers and the tests' raw reads expect them (`Content-Type`).
        .title_case_headers(true)
        .serve_connection(TokioIo::new(WriteTimeout::new(stream)), service);
    tokio::pin!(conn);
    let result = match tokio::time::timeout_at(deadline, conn.as_mut()).await {
        Ok(r) => r,
        Err(_) if head_in.load(Ordering::SeqCst) => conn.await,
        Err(_) => {
            tracing::debug!("closing a connection whose request did not arrive by its deadline");
            return;
        }
    };
    if let Err(e) = result {
        tracing::debug!("page connection: {e}");
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    extra: &[(HeaderName, HeaderValue)],
    body: Body,
) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    for (k, v) in extra {
        h.insert(k.clone(), v.clone());
    }
    resp
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn text(status: StatusCode, text: &str) -> Response<Body> {
    respond(
        status,
        "text/plain; charset=utf-8",
        &[],
        full(format!("{text}\n")),
    )
}

/// A header's value; one that is not text reads as a value no check accepts.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"))
}

/// A state-changing request must come from the page itself. Browsers send `Origin` on every
/// POST (and `Sec-Fetch-Site`); a form or script on another site carries that site's origin.
pub(super) fn check_same_origin(headers: &HeaderMap, host: &str) -> Result<(), &'static str> {
    let site = header(headers, "sec-fetch-site");
    let origin = header(headers, "origin");
    if origin.is_some_and(|o| !o.eq_ignore_ascii_case(&format!("http://{host}"))) {
        return Err(
            "refused: cross-origin request (only the update page itself may start an update)",
        );
    }
    if site.is_some_and(|s| !s.eq_ignore_ascii_case("same-origin")) {
        return Err("refused: this request did not come from the update page (Sec-Fetch-Site)");
    }
    if origin.is_none() && site.is_none() {
        return Err("refused: no Origin header (only the update page itself may start an update)");
    }
    Ok(())
}

/// A request refused before it is served: the status and a sentence for the client.
struct Refusal(StatusCode, String);

impl Refusal {
    fn new(status: StatusCode, why: &str) -> Self {
        Self(status, why.to_owned())
    }

    fn into_response(self) -> Response<Body> {
        text(self.0, &self.1)
    }
}

/// The checks every request passes before it is routed; the `Host` it names.
fn check_request(shared: &Shared, req: &Request<Incoming>) -> Result<String, Refusal> {
    if req.uri().authority().is_some() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "request target must be a path",
        ));
    }
    // Two Hosts or two Origins could make a check read another value than the one a proxy
    // or browser meant.
    for name in ["host", "origin", "content-length", "sec-fetch-site"] {
        if req.headers().get_all(name).iter().count() > 1 {
            return Err(Refusal::new(StatusCode::BAD_REQUEST, "repeated header"));
        }
    }
    match header(req.headers(), "host") {
        Some(h) if shared.hosts.iter().any(|a| a.eq_ignore_ascii_case(h)) => Ok(h.to_owned()),
        _ => Err(Refusal::new(
            StatusCode::MISDIRECTED_REQUEST,
            &format!("this page answers only as http://{}/", shared.hosts[0]),
        )),
    }
}

/// The request body, bounded in size and by the connection's deadline.
async fn read_body(body: Incoming, deadline: Instant) -> Result<Bytes, Refusal> {
    let too_large = || Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    if body.size_hint().lower() > MAX_BODY as u64 {
        return Err(too_large());
    }
    match tokio::time::timeout_at(deadline, Limited::new(body, MAX_BODY).collect()).await {
        Err(_) => Err(Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            "request timed out",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "connection closed mid-body",
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Whether a form body asks for Retry (`retry=1`, as the page's Retry form sends).
pub(super) fn wants_retry(form: &[u8]) -> bool {
    form.split(|b| *b == b'&').any(|pair| pair == b"retry=1")
}

/// A connection's request slot and the pool it came from (taken when it turns into a stream).
type RequestSlot = std::sync::Mutex<Option<(Held, Arc<Slots>)>>;

async fn route(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    deadline: Instant,
    slot: &RequestSlot,
) -> Response<Body> {
    let host = match check_request(shared, &req) {
        Ok(h) => h,
        Err(refusal) => return refusal.into_response(),
    };
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/") => {
            let html = view::render_page(&view::page_state(shared), &lock(&shared.runs));
            let csp = HeaderValue::from_static(view::content_security_policy());
            respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                &[(header::CONTENT_SECURITY_POLICY, csp)],
                full(html),
            )
        }
        (&Method::GET, "/state") => {
            let body = serde_json::to_vec(&view::page_state(shared)).expect("state serialises");
            respond(StatusCode::OK, "application/json", &[], full(body))
        }
        (&Method::GET, "/events") => {
            let taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            let Some(stream_slot) = taken.and_then(|(request, slots)| {
                // The request slot goes back either way: a stream never holds one.
                drop(request);
                slots.stream()
            }) else {
                return respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    &[(header::RETRY_AFTER, HeaderValue::from_static("3"))],
                    full("too many event streams\n"),
                );
            };
            let last = header(req.headers(), "last-event-id");
            let stream = events::stream(Arc::clone(shared), last)
                .take_until(tokio::time::sleep(STREAM_LIFETIME))
                // The stream slot lives as long as the body does.
                .map(move |chunk| {
                    let _ = &stream_slot;
                    chunk
                });
            respond(
                StatusCode::OK,
                "text/event-stream; charset=utf-8",
                &[],
                StreamBody::new(stream).boxed_unsync(),
            )
        }
        (&Method::POST, "/update") => {
            let (parts, body) = req.into_parts();
            // The body is read first (bounded), so even a refused client sees the answer.
            let form = match read_body(body, deadline).await {
                Ok(b) => b,
                Err(refusal) => return refusal.into_response(),
            };
            if let Err(why) = check_same_origin(&parts.headers, &host) {
                tracing::warn!(
                    "refused POST /update from origin {:?}",
                    header(&parts.headers, "origin").unwrap_or("-")
                );
                return text(StatusCode::FORBIDDEN, why);
            }
            let trigger = if wants_retry(&form) {
                Trigger::Retry
            } else {
                Trigger::Update
            };
            let (run, started) = shared.start_or_attach(trigger);
            let wants_json =
                header(&parts.headers, "accept").is_some_and(|a| a.contains("application/json"));
            if wants_json {
                let body = serde_json::json!({ "run": run, "started": started }).to_string();
                respond(StatusCode::ACCEPTED, "application/json", &[], full(body))
            } else {
                // A plain form post (no JavaScript): back to the page, which shows the run.
                let to = HeaderValue::from_static("/");
                respond(
                    StatusCode::SEE_OTHER,
                    "text/plain",
                    &[(header::LOCATION, to)],
                    full(""),
                )
            }
        }
        (_, "/" | "/state" | "/events") => respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            &[(header::ALLOW, HeaderValue::from_static("GET"))],
            full("use GET\n"),
        ),
        (_, "/update") => respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            &[(header::ALLOW, HeaderValue::from_static("POST"))],
            full("an update starts only with POST, from the page\n"),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// The connection's socket, with a bound on how long a write may stay blocked: a client that
/// stops reading (its event stream) fails the write instead of holding its slot for ever.
struct WriteTimeout {
    stream: TcpStream,
    blocked: Option<Pin<Box<Sleep>>>,
}

impl WriteTimeout {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            blocked: None,
        }
    }

    /// `Pending` from the socket starts (or continues) the clock; anything else stops it.
    fn bound<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.blocked = None;
            return polled;
        }
        let sleep = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading",
        )))
    }
}

impl AsyncRead for WriteTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.bound(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.bound(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.bound(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in lines {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn only_the_page_itself_may_post() {
        let host = "127.0.0.1:51337";
        let o = "origin";
        let s = "sec-fetch-site";
        for ok in [
            vec![(o, "http://127.0.0.1:51337")],
            vec![(o, "http://127.0.0.1:51337"), (s, "same-origin")],
            vec![(s, "same-origin")],
        ] {
            assert_eq!(check_same_origin(&headers(&ok), host), Ok(()), "{ok:?}");
        }
        for bad in [
            vec![],
            vec![(o, "http://evil.example")],
            vec![(o, "null")],
            vec![(o, "https://127.0.0.1:51337")],
            vec![(o, "http://127.0.0.1:51338")],
            vec![(o, "http://127.0.0.1:51337"), (s, "cross-site")],
            vec![(s, "same-site")],
            vec![(s, "none")],
        ] {
            assert!(check_same_origin(&headers(&bad), host).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn retry_is_asked_by_the_form_field_only() {
        assert!(wants_retry(b"retry=1"));
        assert!(wants_retry(b"x=2&retry=1"));
        for no in [&b""[..], b"retry=0", b"retry=10", b"xretry=1", b"x=1"] {
            assert!(!wants_retry(no), "{:?}", String::from_utf8_lossy(no));
        }
    }
}
