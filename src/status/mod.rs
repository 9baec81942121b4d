//! The fleet status (being written).
