//! The server side: the fleet repo (`fleet`, `snapshot`, `hostfiles`), turning it into
//! per-host versions in the chroot (`publish`), building hosts (`build`), reading what hosts
//! report (`logs`, `status`), and the SFTP server's accounts and sshd settings (`provision`).

pub mod build;
pub mod fleet;
pub mod hostfiles;
pub mod init;
pub mod logs;
pub mod provision;
pub mod publish;
// Secrets encrypted at rest: [secrets], sealing on publish, `bento secret`.
pub mod secrets;
pub mod snapshot;
pub mod status;
