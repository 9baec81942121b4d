//! Reading the engine's answers: bounded bodies, S3 error documents, headers, and the
//! trust anchors of a `ca_file`.
//!
//! Invariant: no answer is read past its bound (an error document past 64 KiB, a body past
//! its caller's limit + 1).

use std::io::Read;
use std::time::Duration;

use super::{S3Error, Target};

/// A response, its status and headers read; the body still on the wire.
pub(super) type Response = ureq::http::Response<ureq::Body>;

/// The most of an error answer read (its XML names the code and message).
pub(super) const MAX_ERROR_BYTES: u64 = 64 * 1024;

pub(super) fn read_ca_file(
    path: &std::path::Path,
) -> Result<Vec<ureq::tls::Certificate<'static>>, S3Error> {
    crate::sys::http::read_pem_certs(path).map_err(|message| S3Error::CaFile {
        path: path.to_owned(),
        message,
    })
}

pub(super) fn header(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Reads the rest of a small answer so the connection can be reused.
pub(super) fn drain(resp: Response) {
    let mut r = resp.into_body().into_with_config().limit(u64::MAX).reader();
    let _ = std::io::copy(&mut (&mut r).take(MAX_ERROR_BYTES), &mut std::io::sink());
}

pub(super) fn body_error(t: &Target, e: std::io::Error) -> S3Error {
    if e.kind() == std::io::ErrorKind::TimedOut {
        S3Error::Stalled {
            target: t.clone(),
            operation: "reading the body",
            waited: Duration::ZERO,
        }
    } else {
        S3Error::Transport {
            target: t.clone(),
            operation: "reading the body",
            message: e.to_string(),
        }
    }
}

/// The body, at most `limit` bytes (never more than `limit + 1` read).
pub(super) fn read_limited(t: &Target, resp: Response, limit: u64) -> Result<Vec<u8>, S3Error> {
    if let Some(len) = header(&resp, "content-length").and_then(|v| v.parse::<u64>().ok()) {
        if len > limit {
            return Err(S3Error::TooLarge {
                target: t.clone(),
                limit,
            });
        }
    }
    let body = resp.into_body().into_with_config().limit(u64::MAX).reader();
    let mut buf = Vec::new();
    body.take(limit.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| body_error(t, e))?;
    if buf.len() as u64 > limit {
        return Err(S3Error::TooLarge {
            target: t.clone(),
            limit,
        });
    }
    Ok(buf)
}

/// The engine's refusal, with the code and message of its XML answer.
pub(super) fn refused(t: &Target, resp: Response) -> S3Error {
    let status = resp.status().as_u16();
    let body = read_limited(t, resp, MAX_ERROR_BYTES).unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    S3Error::Refused {
        target: t.clone(),
        status,
        code: xml_field(&text, "Code").unwrap_or_else(|| default_code(status).to_owned()),
        message: xml_field(&text, "Message").unwrap_or_default(),
    }
}

/// The code S3 uses for a status when the answer has no body (a HEAD).
fn default_code(status: u16) -> &'static str {
    match status {
        400 => "BadRequest",
        403 => "AccessDenied",
        404 => "NotFound",
        409 => "Conflict",
        412 => "PreconditionFailed",
        _ => "",
    }
}

/// The text of the first `<name>…</name>` (S3 error documents are flat).
pub(super) fn xml_field(text: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find(&format!("</{name}>"))? + start;
    Some(
        text[start..end]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// A key in `x-amz-copy-source`: percent-encoded, `/` kept.
pub(super) fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_documents_give_their_code_and_message() {
        let xml = "<?xml version=\"1.0\"?><Error><Code>RequestTimeTooSkewed</Code><Message>The difference &amp; more</Message></Error>";
        assert_eq!(
            xml_field(xml, "Code").as_deref(),
            Some("RequestTimeTooSkewed")
        );
        assert_eq!(
            xml_field(xml, "Message").as_deref(),
            Some("The difference & more")
        );
        assert_eq!(xml_field(xml, "Resource"), None);
    }

    #[test]
    fn copy_sources_are_encoded_but_keep_slashes() {
        assert_eq!(
            encode_key("hosts/alpha/objects/ab cd+é"),
            "hosts/alpha/objects/ab%20cd%2B%C3%A9"
        );
    }
}
