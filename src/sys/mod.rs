//! Plumbing both sides use: crash-safe file writes, user and group lookups, running other
//! programs, how results reach the terminal, and the S3 client for object stores.

pub mod accounts;
pub mod atomic;
pub mod output;
pub mod process;
pub mod s3;
pub mod terminal;
