//! The blocking S3 client: path-style requests signed with SigV4 (rusty-s3 signs, ureq
//! carries them over rustls), bounded in size and time, with the engine's clock followed.
//!
//! Invariants: a read never takes more than its limit + 1 bytes off the wire; no request
//! waits longer than `stall_timeout` for a byte nor past the deadline; a request the engine
//! refused while its `Date` showed a clock skew is retried once with the corrected time;
//! every error names the endpoint, bucket and key.

use crate::sys::http::RangeCopyError;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use rusty_s3::{Bucket, Method, S3Action, UrlStyle};

use super::answer::{
    body_error, drain, encode_key, header, read_ca_file, read_limited, refused, xml_field,
    Response, MAX_ERROR_BYTES,
};
use super::clock::{parse_http_date, Clock};
use super::credentials::Credentials;
use super::{Got, Head, PutMode, S3Error, Target};

mod listing;

/// How long a signed request stays valid: far beyond any request's start, short enough
/// that a captured URL is soon useless.
const SIGNED_FOR: Duration = Duration::from_secs(15 * 60);

/// How the client reaches the engine.
#[derive(Debug, Clone)]
pub struct Options {
    /// The longest one request may wait for its next byte (the agent's `stall_timeout`).
    pub stall_timeout: Duration,
    /// No request runs past this moment (the agent's `run_timeout`).
    pub deadline: Option<Instant>,
    /// A PEM file of the CA(s) the endpoint's certificate must chain to, instead of the
    /// public web roots.
    pub ca_file: Option<PathBuf>,
    /// Seconds added to the local clock before the first answer corrects it (tests force a
    /// skew this way; 0 otherwise).
    pub clock_offset: i64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            stall_timeout: Duration::from_secs(60),
            deadline: None,
            ca_file: None,
            clock_offset: 0,
        }
    }
}

/// Connections kept open to the engine between requests (see `Client::new`).
const IDLE_CONNECTIONS: usize = 32;

/// One engine (endpoint, region, credentials); buckets and keys are per call.
pub struct Client {
    endpoint: url::Url,
    endpoint_text: String,
    region: String,
    creds: rusty_s3::Credentials,
    agent: ureq::Agent,
    clock: Mutex<Clock>,
    stall: Duration,
    deadline: Option<Instant>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint_text)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(
        endpoint: &str,
        region: &str,
        creds: &Credentials,
        options: &Options,
    ) -> Result<Self, S3Error> {
        let target = Target::endpoint(endpoint);
        let url: url::Url = endpoint.parse().map_err(|e| S3Error::Transport {
            target: target.clone(),
            operation: "parsing the endpoint",
            message: format!("{e}"),
        })?;
        let roots = match &options.ca_file {
            None => ureq::tls::RootCerts::WebPki,
            Some(path) => ureq::tls::RootCerts::new_with_certs(&read_ca_file(path)?),
        };
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(roots)
            .build();
        let stall = Some(options.stall_timeout);
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // S3 does not redirect path-style requests; a redirect would also drop the
            // signature's host.
            .max_redirects(0)
            .tls_config(tls)
            .timeout_connect(stall)
            .timeout_per_read(stall)
            .timeout_per_write(stall)
            .user_agent(concat!("bento/", env!("CARGO_PKG_VERSION")))
            // Status and publish keep up to this many requests in flight to one engine:
            // idle connections beyond ureq's default 3 are kept, not reopened per request.
            .max_idle_connections(IDLE_CONNECTIONS)
            .max_idle_connections_per_host(IDLE_CONNECTIONS)
            .build()
            .new_agent();
        let creds = match &creds.session_token {
            None => rusty_s3::Credentials::new(&creds.access_key, &creds.secret_key),
            Some(t) => rusty_s3::Credentials::new_with_token(
                &creds.access_key,
                &creds.secret_key,
                t.clone(),
            ),
        };
        Ok(Client {
            endpoint: url,
            endpoint_text: endpoint.to_owned(),
            region: region.to_owned(),
            creds,
            agent,
            clock: Mutex::new(Clock::with_offset(options.clock_offset)),
            stall: options.stall_timeout,
            deadline: options.deadline,
        })
    }

    /// Engine time minus local time, in seconds, as last seen.
    pub fn clock_offset(&self) -> i64 {
        self.clock.lock().expect("clock lock").offset()
    }

    /// The offset, when an answer's `Date` made the client correct its clock.
    pub fn clock_correction(&self) -> Option<i64> {
        self.clock.lock().expect("clock lock").correction()
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint_text
    }

    fn target(&self, bucket: &str, key: &str) -> Target {
        Target {
            endpoint: self.endpoint_text.clone(),
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        }
    }

    fn bucket(&self, target: &Target) -> Result<Bucket, S3Error> {
        Bucket::new(
            self.endpoint.clone(),
            UrlStyle::Path,
            target.bucket.clone(),
            self.region.clone(),
        )
        .map_err(|e| S3Error::Transport {
            target: target.clone(),
            operation: "naming the bucket",
            message: e.to_string(),
        })
    }

    /// `key`, at most `limit` bytes; with `if_none_match` (an ETag read before), an
    /// unchanged object is [`Got::NotModified`] and costs no body.
    pub fn get(
        &self,
        bucket: &str,
        key: &str,
        limit: u64,
        if_none_match: Option<&str>,
    ) -> Result<Got, S3Error> {
        let t = self.target(bucket, key);
        let b = self.bucket(&t)?;
        let mut headers = Vec::new();
        if let Some(etag) = if_none_match {
            headers.push(("if-none-match", etag.to_owned()));
        }
        let resp = self.call(&t, "GET", Method::Get, &headers, None, &|time| {
            b.get_object(Some(&self.creds), key)
                .sign_with_time(SIGNED_FOR, time)
        })?;
        match resp.status().as_u16() {
            200 => {
                let etag = header(&resp, "etag");
                let modified = header(&resp, "last-modified").and_then(|d| parse_http_date(&d));
                let bytes = read_limited(&t, resp, limit)?;
                Ok(Got::Body {
                    bytes,
                    etag,
                    modified,
                })
            }
            304 => Ok(Got::NotModified),
            404 => Ok(Got::NotFound),
            _ => Err(refused(&t, resp)),
        }
    }

    /// Appends bytes `from..from + max` of `key` (fewer where it ends) to `out`; returns how
    /// many, `None` when the key does not exist.
    pub fn get_range(
        &self,
        bucket: &str,
        key: &str,
        from: u64,
        max: u64,
        out: &mut dyn Write,
    ) -> Result<Option<u64>, S3Error> {
        let t = self.target(bucket, key);
        if max == 0 {
            return Ok(Some(0));
        }
        let b = self.bucket(&t)?;
        let headers = [("range", format!("bytes={from}-{}", from + max - 1))];
        let resp = self.call(&t, "GET", Method::Get, &headers, None, &|time| {
            b.get_object(Some(&self.creds), key)
                .sign_with_time(SIGNED_FOR, time)
        })?;
        let skip = match resp.status().as_u16() {
            206 => 0,
            // An engine that ignores `Range` sends it all: skip what is already here.
            200 => from,
            // Nothing at or after `from`: the object is not longer than what we have.
            416 => return Ok(Some(0)),
            404 => return Ok(None),
            _ => return Err(refused(&t, resp)),
        };
        let body = resp.into_body().into_with_config().limit(u64::MAX).reader();
        match crate::sys::http::copy_range(body, skip, max, out) {
            Ok(n) => Ok(Some(n)),
            Err(RangeCopyError::Read(e)) => Err(body_error(&t, e)),
            Err(RangeCopyError::Write(source)) => Err(S3Error::Write { target: t, source }),
        }
    }

    /// The size and ETag of `key`, `None` when it does not exist.
    pub fn head(&self, bucket: &str, key: &str) -> Result<Option<Head>, S3Error> {
        let t = self.target(bucket, key);
        let b = self.bucket(&t)?;
        let resp = self.call(&t, "HEAD", Method::Head, &[], None, &|time| {
            b.head_object(Some(&self.creds), key)
                .sign_with_time(SIGNED_FOR, time)
        })?;
        match resp.status().as_u16() {
            200 => Ok(Some(Head {
                size: header(&resp, "content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                etag: header(&resp, "etag"),
            })),
            404 => Ok(None),
            _ => Err(refused(&t, resp)),
        }
    }

    /// Writes `bytes` to `key` as `mode` says; returns the new ETag when the engine gives
    /// one. A lost compare-and-swap is [`S3Error::PreconditionFailed`].
    pub fn put(
        &self,
        bucket: &str,
        key: &str,
        bytes: &[u8],
        mode: PutMode<'_>,
    ) -> Result<Option<String>, S3Error> {
        let t = self.target(bucket, key);
        let b = self.bucket(&t)?;
        let mut headers = Vec::new();
        match mode {
            PutMode::Overwrite => {}
            PutMode::Create => headers.push(("if-none-match", "*".to_owned())),
            PutMode::Replace(etag) => headers.push(("if-match", etag.to_owned())),
        }
        let resp = self.call(&t, "PUT", Method::Put, &headers, Some(bytes), &|time| {
            b.put_object(Some(&self.creds), key)
                .sign_with_time(SIGNED_FOR, time)
        })?;
        match resp.status().as_u16() {
            200 | 201 | 204 => {
                let etag = header(&resp, "etag");
                drain(resp);
                Ok(etag)
            }
            // 409: some engines answer a concurrent conditional write so.
            412 | 409 if !matches!(mode, PutMode::Overwrite) => {
                drain(resp);
                Err(S3Error::PreconditionFailed { target: t })
            }
            _ => Err(refused(&t, resp)),
        }
    }

    /// Copies `src_bucket/src_key` to `bucket/key` inside the engine (no bytes through us).
    pub fn copy(
        &self,
        src_bucket: &str,
        src_key: &str,
        bucket: &str,
        key: &str,
    ) -> Result<(), S3Error> {
        let t = self.target(bucket, key);
        let b = self.bucket(&t)?;
        let source = format!("/{src_bucket}/{}", encode_key(src_key));
        // x-amz-* headers must be signed.
        let signed = [("x-amz-copy-source", source)];
        let resp = self.call(&t, "CopyObject", Method::Put, &signed, Some(&[]), &|time| {
            let mut a = b.put_object(Some(&self.creds), key);
            a.headers_mut()
                .insert("x-amz-copy-source", signed[0].1.clone());
            a.sign_with_time(SIGNED_FOR, time)
        })?;
        match resp.status().as_u16() {
            200 => {
                // AWS may answer 200 and put the error in the body.
                let body = read_limited(&t, resp, MAX_ERROR_BYTES)?;
                let text = String::from_utf8_lossy(&body);
                if text.contains("<Error>") {
                    return Err(S3Error::Refused {
                        target: t,
                        status: 200,
                        code: xml_field(&text, "Code").unwrap_or_default(),
                        message: xml_field(&text, "Message").unwrap_or_default(),
                    });
                }
                Ok(())
            }
            _ => Err(refused(&t, resp)),
        }
    }

    /// Removes `key` (a key already gone is not an error).
    pub fn delete(&self, bucket: &str, key: &str) -> Result<(), S3Error> {
        let t = self.target(bucket, key);
        let b = self.bucket(&t)?;
        let resp = self.call(&t, "DELETE", Method::Delete, &[], None, &|time| {
            b.delete_object(Some(&self.creds), key)
                .sign_with_time(SIGNED_FOR, time)
        })?;
        match resp.status().as_u16() {
            200 | 204 | 404 => {
                drain(resp);
                Ok(())
            }
            _ => Err(refused(&t, resp)),
        }
    }

    /// Creates `bucket` (one that this identity already owns is fine).
    pub fn create_bucket(&self, bucket: &str) -> Result<(), S3Error> {
        let t = self.target(bucket, "");
        let b = self.bucket(&t)?;
        let resp = self.call(&t, "CreateBucket", Method::Put, &[], Some(&[]), &|time| {
            b.create_bucket(&self.creds)
                .sign_with_time(SIGNED_FOR, time)
        })?;
        match resp.status().as_u16() {
            200 | 204 => {
                drain(resp);
                Ok(())
            }
            409 => {
                let e = refused(&t, resp);
                match &e {
                    S3Error::Refused { code, .. } if code == "BucketAlreadyOwnedByYou" => Ok(()),
                    _ => Err(e),
                }
            }
            _ => Err(refused(&t, resp)),
        }
    }

    /// Sends one request signed at the engine's time as known; when the answer's `Date`
    /// corrects that time and the engine refused the request (400/403: SigV4 refuses a
    /// skewed or expired signature so), signs and sends it once more.
    fn call(
        &self,
        t: &Target,
        operation: &'static str,
        method: Method,
        headers: &[(&'static str, String)],
        body: Option<&[u8]>,
        sign: &dyn Fn(&jiff::Timestamp) -> url::Url,
    ) -> Result<Response, S3Error> {
        let mut retried = false;
        loop {
            let now = self
                .clock
                .lock()
                .expect("clock lock")
                .now(SystemTime::now());
            let time = jiff::Timestamp::try_from(now).map_err(|e| S3Error::Transport {
                target: t.clone(),
                operation,
                message: format!("the clock: {e}"),
            })?;
            let url = sign(&time);
            let resp = self.send(t, operation, method, &url, headers, body)?;
            let corrected = header(&resp, "date")
                .and_then(|d| parse_http_date(&d))
                .is_some_and(|engine| {
                    let changed = self
                        .clock
                        .lock()
                        .expect("clock lock")
                        .observe(SystemTime::now(), engine);
                    if changed {
                        tracing::warn!(
                            "{}: the engine's clock is {:+} s from this machine's; signing with its time",
                            self.endpoint_text,
                            self.clock_offset()
                        );
                    }
                    changed
                });
            if corrected && !retried && matches!(resp.status().as_u16(), 400 | 403) {
                drain(resp);
                retried = true;
                continue;
            }
            return Ok(resp);
        }
    }

    fn send(
        &self,
        t: &Target,
        operation: &'static str,
        method: Method,
        url: &url::Url,
        headers: &[(&'static str, String)],
        body: Option<&[u8]>,
    ) -> Result<Response, S3Error> {
        let left = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        if left == Some(Duration::ZERO) {
            return Err(S3Error::Deadline {
                target: t.clone(),
                operation,
            });
        }
        let uri = url.as_str();
        let result = match method {
            Method::Put | Method::Post => {
                let mut b = if method == Method::Put {
                    self.agent.put(uri)
                } else {
                    self.agent.post(uri)
                };
                for (k, v) in headers {
                    b = b.header(*k, v);
                }
                b.config()
                    .timeout_global(left)
                    .build()
                    .send(body.unwrap_or(&[]))
            }
            _ => {
                let mut b = match method {
                    Method::Head => self.agent.head(uri),
                    Method::Delete => self.agent.delete(uri),
                    _ => self.agent.get(uri),
                };
                for (k, v) in headers {
                    b = b.header(*k, v);
                }
                b.config().timeout_global(left).build().call()
            }
        };
        result.map_err(|e| self.transport_error(t, operation, e, left))
    }

    fn transport_error(
        &self,
        t: &Target,
        operation: &'static str,
        e: ureq::Error,
        left: Option<Duration>,
    ) -> S3Error {
        match e {
            ureq::Error::Timeout(_) if left.is_some_and(|l| l <= self.stall) => S3Error::Deadline {
                target: t.clone(),
                operation,
            },
            ureq::Error::Timeout(_) => S3Error::Stalled {
                target: t.clone(),
                operation,
                waited: self.stall,
            },
            e => S3Error::Transport {
                target: t.clone(),
                operation,
                message: e.to_string(),
            },
        }
    }
}
