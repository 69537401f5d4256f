//! vireod, the host daemon (see `docs/hostd.md`). What exists so far is its foundation: the
//! inventory store (`store`) — VMs with their spec, identity and state in SQLite under the state
//! directory, each with a folder `vms/<id>/` — with schema migrations (`schema`) and the folder
//! rules (`folders`). The API server, worker supervision and the rest build on it.
#![forbid(unsafe_code)]

mod api_error;
pub mod error;
pub mod folders;
mod jobs;
pub mod limits;
pub mod schema;
pub mod store;

pub use error::StoreError;
pub use limits::host_limits;
pub use store::{Store, VmRecord, DEFAULT_LIMITS};
