//! Building hosts on the server (being written).
