//! How the agent reads its chroot (being written).
