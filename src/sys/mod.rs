//! Plumbing both sides use: crash-safe file writes, user and group lookups, running other
//! programs, and how results reach the terminal.

pub mod accounts;
pub mod atomic;
pub mod output;
pub mod process;
pub mod terminal;
