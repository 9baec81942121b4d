//! The server side: the fleet repo (`fleet`, `snapshot`, `hostfiles`), turning it into
//! per-host versions in the chroot (`publish`), building hosts (`build`), reading what hosts
//! report (`logs`, `status`), and the SFTP server's accounts and sshd settings (`provision`).

pub mod build;
pub mod chroot;
/// Issue #12: evaluation gate, no-churn systems, binary caches for `build_on = "server"`.
pub mod delivery;
// Issue #25: `bento host add` and `bento agent-config`.
pub mod enrol;
pub mod eval;
// Issue #27: copies of the live trees for mirrors (`bento publish --export`).
pub mod export;
pub mod fleet;
pub mod history;
pub mod hostfiles;
pub mod init;
pub mod logs;
/// Issue #12: what the working tree builds to, before a publish.
pub mod preview;
pub mod provision;
pub mod publish;
pub mod records;
// rollout (#13): selection, waves, remote trigger, waiting, server-side rollback.
pub mod rollback;
pub mod rollout;
pub mod s3policy;
pub mod select;
pub mod store;
// Secrets encrypted at rest: [secrets], sealing on publish, `bento secret`.
pub mod secrets;
pub mod snapshot;
pub mod status;
pub mod targets;
pub mod trigger;
pub mod wait;
