//! The fleet status: what every host runs against what was published for it. `state` is
//! the pure decision, `collect` reads the chroot (host files only through `server::logs`,
//! as `hostlogs` reads and notes them), `render` makes the table and the Prometheus textfile, `watch` waits for changes.

pub mod collect;
mod heads;
mod hostlogs;
pub mod memo;
pub mod render;
pub mod skew;
pub mod state;
pub mod watch;

pub use collect::{collect, host_status, ExpectedFrom, HostStatus, Query};
pub use heads::Heads;
pub use state::{assess, Assessment, Facts, Published, State};
