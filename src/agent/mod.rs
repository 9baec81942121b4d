//! The machine-side agent (being written).
