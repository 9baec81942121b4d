//! `bento server …` against a real sshd (being written).
