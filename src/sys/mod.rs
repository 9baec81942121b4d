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
