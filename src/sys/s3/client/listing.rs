//! Listing keys (ListObjectsV2): every page of a prefix, or one level of it.
//!
//! Invariant: a listing is bounded in pages and each page in bytes; a listing longer than
//! that is an error, never a truncated answer.

use rusty_s3::actions::ListObjectsV2;
use rusty_s3::{Method, S3Action};

use super::super::answer::{read_limited, refused};
use super::super::{Listed, S3Error};
use super::{Client, SIGNED_FOR};

/// The most of one listing page read (1,000 keys with their metadata fit many times over).
const MAX_LIST_PAGE_BYTES: u64 = 16 * 1024 * 1024;
/// Keys per listing page (S3's maximum).
const LIST_PAGE_KEYS: usize = 1000;
/// A listing longer than this many pages is refused rather than read forever.
const MAX_LIST_PAGES: usize = 100_000;

impl Client {
    /// Every key under `prefix` (give it its trailing slash: SeaweedFS lists nothing
    /// without), all pages.
    pub fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<Listed>, S3Error> {
        self.list_paged(bucket, prefix, LIST_PAGE_KEYS)
    }

    /// The keys directly under `prefix` (ending in `/`): deeper ones are not sent, so a
    /// directory's listing costs the same however much its subdirectories hold.
    pub fn list_level(&self, bucket: &str, prefix: &str) -> Result<Vec<Listed>, S3Error> {
        self.list_with(bucket, prefix, LIST_PAGE_KEYS, true, None)
    }

    /// The keys under `prefix` that sort after `after` (a whole key, prefix included): what
    /// follows one part of a prefix, in one request where it holds fewer than a page. An
    /// engine that ignores `StartAfter` answers with more keys, never fewer: filter them.
    pub fn list_after(
        &self,
        bucket: &str,
        prefix: &str,
        after: &str,
    ) -> Result<Vec<Listed>, S3Error> {
        self.list_with(bucket, prefix, LIST_PAGE_KEYS, false, Some(after))
    }

    /// [`Client::list`] asking for `page` keys per request.
    pub fn list_paged(
        &self,
        bucket: &str,
        prefix: &str,
        page: usize,
    ) -> Result<Vec<Listed>, S3Error> {
        self.list_with(bucket, prefix, page, false, None)
    }

    fn list_with(
        &self,
        bucket: &str,
        prefix: &str,
        page: usize,
        one_level: bool,
        after: Option<&str>,
    ) -> Result<Vec<Listed>, S3Error> {
        let t = self.target(bucket, prefix);
        let b = self.bucket(&t)?;
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let resp = self.call(&t, "ListObjectsV2", Method::Get, &[], None, &|time| {
                let mut a = ListObjectsV2::new(&b, Some(&self.creds));
                a.with_max_keys(page);
                if one_level {
                    a.with_delimiter("/");
                }
                if !prefix.is_empty() {
                    a.with_prefix(prefix);
                }
                if let Some(tok) = &token {
                    a.with_continuation_token(tok.clone());
                }
                if let Some(after) = after {
                    a.with_start_after(after);
                }
                a.sign_with_time(SIGNED_FOR, time)
            })?;
            if resp.status().as_u16() != 200 {
                return Err(refused(&t, resp));
            }
            let body = read_limited(&t, resp, MAX_LIST_PAGE_BYTES)?;
            let text = String::from_utf8_lossy(&body);
            let page = ListObjectsV2::parse_response(&text).map_err(|e| S3Error::Protocol {
                target: t.clone(),
                message: format!("unreadable listing: {e}"),
            })?;
            out.extend(page.contents.into_iter().map(|c| {
                Listed {
                    key: c.key,
                    size: c.size.unwrap_or(0),
                    etag: c.etag,
                    modified: c
                        .last_modified
                        .and_then(|t| humantime::parse_rfc3339_weak(&t).ok()),
                }
            }));
            match page.next_continuation_token {
                Some(next) if !next.is_empty() => token = Some(next),
                _ => return Ok(out),
            }
        }
        Err(S3Error::Protocol {
            target: t,
            message: format!("more than {MAX_LIST_PAGES} pages of keys"),
        })
    }
}
