//! `bento build`, `publish --build`, `bento diff` and `bento flake-update` with real Nix.
