//! vireod, the host daemon (see `docs/hostd.md`). The inventory store (`store`) — VMs with
//! their spec, identity and state in SQLite under the state directory, each with a folder
//! `vms/<id>/` — with schema migrations (`schema`) and the folder rules (`folders`); on it the
//! daemon (`daemon`): the REST API on a Unix socket, jobs, and the supervision and re-adoption
//! of the `vireo-vm` workers.
// The only unsafe code (signals, setsid, umask) is in `daemon::sys`, which allows it.
#![deny(unsafe_code)]

mod api_error;
pub mod checkpoint_store;
pub mod daemon;
pub mod error;
pub mod folders;
pub mod host_trust;
mod jobs;
pub mod limits;
mod meter_store;
mod pool_store;
pub mod schema;
pub mod store;
pub mod switch_store;

pub use error::StoreError;
pub use limits::host_limits;
pub use store::{Store, VmRecord, DEFAULT_LIMITS};
