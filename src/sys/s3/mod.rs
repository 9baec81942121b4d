//! S3-compatible object stores, as plumbing both sides use: the `s3://` URL contract
//! (`location`), credentials (`credentials`), the engine's clock (`clock`) and a blocking
//! client with the operations bento needs (`client`): bounded and ranged GET, conditional
//! GET, HEAD, conditional PUT, server-side copy, listing and DELETE.
//!
//! Invariant: every error names the endpoint, bucket and key it is about, and says whether
//! the engine refused (with its code), a conditional write lost, or the link failed.

mod answer;
mod client;
mod clock;
mod credentials;
mod location;

use std::path::PathBuf;
use std::time::Duration;

pub use client::{Client, Options};
pub use clock::{Clock, TOLERANCE_SECS};
pub use credentials::{Credentials, CredentialsError};
pub use location::{Location, LocationError, DEFAULT_REGION, HOST_PLACEHOLDER};

/// What a request was about, for its errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub endpoint: String,
    pub bucket: String,
    pub key: String,
}

impl Target {
    fn endpoint(endpoint: &str) -> Self {
        Target {
            endpoint: endpoint.to_owned(),
            bucket: String::new(),
            key: String::new(),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{} at {}", self.bucket, self.key, self.endpoint)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The engine answered with an error (403 AccessDenied, 400, 500 …).
    #[error("{target}: refused ({status} {code}){}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Refused {
        target: Target,
        status: u16,
        code: String,
        message: String,
    },
    /// A conditional write lost: the key changed (or appeared) since it was read.
    #[error("{target}: the key changed since it was read (another writer won)")]
    PreconditionFailed { target: Target },
    #[error("{target} is larger than {limit} bytes")]
    TooLarge { target: Target, limit: u64 },
    #[error("{target}: no answer to {operation} within {}", humantime::format_duration(*.waited))]
    Stalled {
        target: Target,
        operation: &'static str,
        waited: Duration,
    },
    #[error("{target}: the run's deadline passed during {operation}")]
    Deadline {
        target: Target,
        operation: &'static str,
    },
    #[error("{target}: {operation}: {message}")]
    Transport {
        target: Target,
        operation: &'static str,
        message: String,
    },
    #[error("{target}: writing what was read: {source}")]
    Write {
        target: Target,
        source: std::io::Error,
    },
    #[error("{target}: {message}")]
    Protocol { target: Target, message: String },
    #[error("ca_file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
}

impl S3Error {
    /// The engine stopped answering (as opposed to refusing).
    pub fn is_stall(&self) -> bool {
        matches!(self, S3Error::Stalled { .. } | S3Error::Deadline { .. })
    }

    pub fn target(&self) -> Option<&Target> {
        match self {
            S3Error::Refused { target, .. }
            | S3Error::PreconditionFailed { target }
            | S3Error::TooLarge { target, .. }
            | S3Error::Stalled { target, .. }
            | S3Error::Deadline { target, .. }
            | S3Error::Transport { target, .. }
            | S3Error::Write { target, .. }
            | S3Error::Protocol { target, .. } => Some(target),
            S3Error::CaFile { .. } => None,
        }
    }
}

/// A read's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    Body {
        bytes: Vec<u8>,
        etag: Option<String>,
        /// `Last-Modified`: when the engine received the value, by its clock.
        modified: Option<std::time::SystemTime>,
    },
    /// The ETag given with `If-None-Match` still matches.
    NotModified,
    NotFound,
}

/// What HEAD tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub size: u64,
    pub etag: Option<String>,
}

/// One key of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
    /// When the engine received the value, by its clock.
    pub modified: Option<std::time::SystemTime>,
}

/// How a PUT may replace what is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode<'a> {
    /// Whatever is there.
    Overwrite,
    /// Only when the key does not exist (`If-None-Match: *`).
    Create,
    /// Only when the key still has this ETag (`If-Match`).
    Replace(&'a str),
}
