//! The seam through which `bento publish` lets delivery work happen under its lock, on the
//! exact plans it is about to publish (issue #12: the evaluation gate, expected systems,
//! binary caches for `build_on = "server"`; implemented in `server::delivery`).

use super::{HostPlan, HostReport, PublishError};
use crate::protocol::layout::Chroot;
use crate::server::store::Store;

pub trait Delivery: Sync {
    /// Runs after planning and before any host is written. May set each plan's `system`;
    /// returns the plans to publish and one failed report per host it holds back (that host's
    /// previous version stays live).
    /// `store` holds the hosts' versions and their `cache/`; `chroot` is the publisher's
    /// own state (its `.bento/`: the binary-cache pool, build records), never served.
    fn before(
        &self,
        store: &dyn Store,
        chroot: &Chroot,
        plans: Vec<HostPlan>,
    ) -> (Vec<HostPlan>, Vec<HostReport>);
    /// Runs after the hosts are published and their old versions collected.
    fn after(&self, store: &dyn Store, chroot: &Chroot) -> Result<(), PublishError>;
}
