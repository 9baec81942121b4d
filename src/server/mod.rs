//! The server side: the fleet repo (`fleet`, `snapshot`, `hostfiles`), turning it into
//! per-host versions in the chroot (`publish`), building hosts (`build`), reading what hosts
//! report (`logs`, `status`), and the SFTP server's accounts and sshd settings (`provision`).

pub mod build;
/// Issue #12: evaluation gate, no-churn systems, binary caches for `build_on = "server"`.
pub mod delivery;
pub mod eval;
pub mod fleet;
pub mod history;
pub mod hostfiles;
pub mod init;
pub mod logs;
/// Issue #12: what the working tree builds to, before a publish.
pub mod preview;
pub mod provision;
pub mod publish;
pub mod snapshot;
pub mod status;
