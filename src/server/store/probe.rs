//! Whether an object store honours conditional writes, found by trying (Garage 2.x accepts
//! `If-Match`/`If-None-Match` and ignores them): a probe key is created, created again and
//! replaced from a wrong ETag; both must lose. The answer is recorded in the publisher's
//! state, so a publish knows which guard it has (compare-and-swap, or only its lock).
//!
//! Invariant: the probe writes one key of its own in a host's area (no key of the protocol:
//! no agent reads it) and removes it.

use std::path::PathBuf;

use super::Cas;
use crate::protocol::layout::Chroot;
use crate::protocol::HostName;
use crate::sys::s3::{Client, Location, PutMode, S3Error};

/// The probe's key inside a host's area.
pub const PROBE_KEY: &str = ".bento-cas-probe";
/// Where the answer is kept in the publisher's state directory.
pub const RECORD_FILE: &str = "s3-conditional-writes";

fn record_path(state: &Chroot) -> PathBuf {
    state.state_dir().join(RECORD_FILE)
}

/// The answer the last probe recorded, `Unknown` when none did.
pub fn recorded(state: &Chroot) -> Cas {
    match std::fs::read_to_string(record_path(state))
        .as_deref()
        .map(str::trim)
    {
        Ok("honoured") => Cas::Honoured,
        Ok("ignored") => Cas::Ignored,
        _ => Cas::Unknown,
    }
}

/// Keeps `cas` for later runs (root-only, in the state directory).
pub fn record(state: &Chroot, cas: Cas) -> std::io::Result<()> {
    let text = match cas {
        Cas::Honoured => "honoured\n",
        Cas::Ignored => "ignored\n",
        Cas::Unknown => return Ok(()),
    };
    std::fs::create_dir_all(state.state_dir())?;
    crate::sys::atomic::write_file(&record_path(state), text.as_bytes(), 0o600)
}

/// Tries the engine's conditional writes at `host`'s location, with a key of its own.
pub fn probe(client: &Client, files: &Location, host: &HostName) -> Result<Cas, S3Error> {
    let l = files
        .for_host(host.as_str())
        .map_err(|e| S3Error::Protocol {
            target: crate::sys::s3::Target {
                endpoint: files.endpoint.clone(),
                bucket: files.bucket.clone(),
                key: String::new(),
            },
            message: e.to_string(),
        })?;
    let key = l.key(PROBE_KEY);
    let bucket = &l.bucket;
    client.delete(bucket, &key)?;
    client.put(bucket, &key, b"1", PutMode::Create)?;
    let lost = |r: Result<Option<String>, S3Error>| -> Result<bool, S3Error> {
        match r {
            Err(S3Error::PreconditionFailed { .. }) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        }
    };
    let create_again = lost(client.put(bucket, &key, b"2", PutMode::Create));
    let stale = lost(client.put(
        bucket,
        &key,
        b"3",
        PutMode::Replace("\"00000000000000000000000000000000\""),
    ));
    let removed = client.delete(bucket, &key);
    let honoured = create_again? && stale?;
    removed?;
    Ok(if honoured {
        Cas::Honoured
    } else {
        Cas::Ignored
    })
}
