//! The URL contract of an object store: `s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION`,
//! where `{host}` in the bucket or the prefix stands for each host's name (in the prefix: one
//! prefix per host; in the bucket: one bucket per host).
//!
//! Invariant: a parsed [`Location`] names a valid bucket (or a template that becomes one for
//! a valid host name), a prefix with no empty, `.` or `..` segment, and an endpoint that is
//! `https://`, or `http://` only on a loopback address (tests), so keys and credentials never
//! cross a network in clear text.

use std::fmt;

/// What stands for the host's name in a template.
pub const HOST_PLACEHOLDER: &str = "{host}";
/// The region when the URL names none (what most engines accept, and AWS's default).
pub const DEFAULT_REGION: &str = "us-east-1";

/// Where one host's files (or every host's, as a template) live in an object store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// `http[s]://host[:port]`, without a trailing slash.
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Without leading or trailing slash; empty for a bucket's root.
    pub prefix: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{url:?}: {message}")]
pub struct LocationError {
    pub url: String,
    pub message: String,
}

impl std::str::FromStr for Location {
    type Err = LocationError;
    fn from_str(s: &str) -> Result<Self, LocationError> {
        let err = |message: String| LocationError {
            url: s.to_owned(),
            message,
        };
        let usage = "use s3://BUCKET/PREFIX?endpoint=https://HOST[:PORT]&region=REGION";
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| err(usage.to_owned()))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        let prefix = prefix.trim_end_matches('/');
        let (mut endpoint, mut region) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| err(format!("bad escape in {k}")))?;
            match k {
                "endpoint" if endpoint.is_none() => endpoint = Some(v),
                "region" if region.is_none() => region = Some(v),
                "endpoint" | "region" => return Err(err(format!("{k} is given twice"))),
                _ => {
                    return Err(err(format!(
                        "unknown parameter {k:?} (known: endpoint, region)"
                    )))
                }
            }
        }
        let endpoint = endpoint.ok_or_else(|| {
            err(format!(
                "the endpoint is missing ({usage}; AWS: https://s3.REGION.amazonaws.com)"
            ))
        })?;
        let endpoint = check_endpoint(&endpoint).map_err(err)?;
        let region = region.unwrap_or_else(|| DEFAULT_REGION.to_owned());
        if region.is_empty()
            || !region
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(err(format!("bad region {region:?}")));
        }
        // A template is checked as the bucket a short valid host name would give.
        check_bucket(&bucket.replace(HOST_PLACEHOLDER, "host")).map_err(err)?;
        check_prefix(prefix).map_err(err)?;
        Ok(Location {
            endpoint,
            region,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        write!(f, "?endpoint={}&region={}", self.endpoint, self.region)
    }
}

impl Location {
    /// Whether `{host}` appears (in the bucket or the prefix).
    pub fn is_template(&self) -> bool {
        self.bucket.contains(HOST_PLACEHOLDER) || self.prefix.contains(HOST_PLACEHOLDER)
    }

    /// Whether each host has a bucket of its own (`{host}` in the bucket name).
    pub fn bucket_per_host(&self) -> bool {
        self.bucket.contains(HOST_PLACEHOLDER)
    }

    /// The location of `host`'s files: `{host}` replaced by its name. `host` must be a valid
    /// host name (lower-case letters, digits, `-`); the bucket it makes is checked again.
    pub fn for_host(&self, host: &str) -> Result<Location, LocationError> {
        let bucket = self.bucket.replace(HOST_PLACEHOLDER, host);
        let prefix = self.prefix.replace(HOST_PLACEHOLDER, host);
        let err = |message: String| LocationError {
            url: self.to_string(),
            message: format!("for host {host}: {message}"),
        };
        check_bucket(&bucket).map_err(err)?;
        check_prefix(&prefix).map_err(err)?;
        Ok(Location {
            bucket,
            prefix,
            ..self.clone()
        })
    }

    /// The key of `rel` (a path relative to the host's directory, as in the chroot).
    pub fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_owned()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }

    /// What a listing of everything under this location asks for: the prefix with its
    /// trailing slash (SeaweedFS lists nothing without it), or nothing for a bucket's root.
    pub fn list_prefix(&self) -> String {
        if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        }
    }
}

/// `%XX` escapes (an endpoint URL inside a query may be escaped); `None` on a bad one.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn check_endpoint(endpoint: &str) -> Result<String, String> {
    let endpoint = endpoint.trim_end_matches('/');
    let (scheme, authority) = endpoint
        .split_once("://")
        .ok_or_else(|| format!("endpoint {endpoint:?} needs https://"))?;
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "endpoint {endpoint:?}: use https://HOST[:PORT] (path-style, no path)"
        ));
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    match scheme {
        "https" => Ok(endpoint.to_owned()),
        "http" if is_loopback(host) => Ok(endpoint.to_owned()),
        "http" => Err(format!(
            "endpoint {endpoint:?}: http:// sends requests in clear text; use https:// (http:// is allowed on a loopback address only)"
        )),
        _ => Err(format!("endpoint {endpoint:?} needs https://")),
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// S3's bucket naming rules (the strict, DNS-compatible ones every engine accepts).
fn check_bucket(bucket: &str) -> Result<(), String> {
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !bucket.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad bucket name {bucket:?}: 3 to 63 lower-case letters, digits, '-' or '.'"
        ))
    }
}

fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Ok(());
    }
    let bad = prefix.starts_with('/')
        || prefix
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        || prefix.chars().any(|c| c.is_control() || c == '\\');
    if bad {
        Err(format!(
            "bad prefix {prefix:?}: no empty, '.' or '..' segments"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(s: &str) -> Location {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn prefix_per_host_and_bucket_per_host() {
        let t = loc("s3://fleet/hosts/{host}?endpoint=https://s3.example.org:9000&region=garage");
        assert!(t.is_template() && !t.bucket_per_host());
        let a = t.for_host("alpha").unwrap();
        assert_eq!(a.bucket, "fleet");
        assert_eq!(a.prefix, "hosts/alpha");
        assert_eq!(a.key("current"), "hosts/alpha/current");
        assert_eq!(a.list_prefix(), "hosts/alpha/");
        assert_eq!(a.endpoint, "https://s3.example.org:9000");
        assert_eq!(a.region, "garage");

        let t = loc("s3://bento-{host}?endpoint=https://s3.example.org");
        assert!(t.bucket_per_host());
        let a = t.for_host("alpha").unwrap();
        assert_eq!(a.bucket, "bento-alpha");
        assert_eq!(a.key("objects/ab"), "objects/ab");
        assert_eq!(a.list_prefix(), "");
        assert_eq!(a.region, DEFAULT_REGION);
    }

    #[test]
    fn the_agents_form_names_its_host_literally_and_round_trips() {
        let s = "s3://fleet/hosts/alpha?endpoint=http://127.0.0.1:8333&region=us-east-1";
        let a = loc(s);
        assert!(!a.is_template());
        assert_eq!(a.to_string(), s);
        assert_eq!(loc(&a.to_string()), a);
        // A trailing slash on the prefix or the endpoint is the same location.
        let b = loc("s3://fleet/hosts/alpha/?endpoint=http%3A%2F%2F127.0.0.1%3A8333%2F");
        assert_eq!(b, a);
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (bad, needle) in [
            ("https://fleet/x?endpoint=https://e", "s3://"),
            ("s3://fleet/x", "endpoint is missing"),
            ("s3://fleet/x?endpoint=http://s3.example.org", "clear text"),
            ("s3://fleet/x?endpoint=http://10.0.0.1:9000", "clear text"),
            ("s3://fleet/x?endpoint=ftp://e", "https://"),
            ("s3://fleet/x?endpoint=https://e/path", "no path"),
            ("s3://Fleet/x?endpoint=https://e", "bad bucket"),
            ("s3://fl?endpoint=https://e", "bad bucket"),
            ("s3://fleet/a//b?endpoint=https://e", "bad prefix"),
            ("s3://fleet/a/../b?endpoint=https://e", "bad prefix"),
            (
                "s3://fleet/x?endpoint=https://e&colour=red",
                "unknown parameter",
            ),
            (
                "s3://fleet/x?endpoint=https://e&endpoint=https://f",
                "twice",
            ),
            ("s3://fleet/x?endpoint=https://e&region=a/b", "bad region"),
            ("s3://fleet/x?endpoint=%zz", "bad escape"),
        ] {
            let e = bad.parse::<Location>().unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
            assert!(e.contains(bad), "{bad}: {e}");
        }
        for ok in [
            "s3://fleet/x?endpoint=http://localhost:9000",
            "s3://fleet/x?endpoint=http://[::1]:9000",
            "s3://fleet?endpoint=https://e",
        ] {
            loc(ok);
        }
    }

    #[test]
    fn a_host_that_makes_a_bad_bucket_is_refused() {
        let t = loc("s3://{host}?endpoint=https://e");
        let e = t.for_host("ab").unwrap_err().to_string();
        assert!(e.contains("for host ab") && e.contains("bad bucket"), "{e}");
        assert_eq!(t.for_host("alpha").unwrap().bucket, "alpha");
    }
}
