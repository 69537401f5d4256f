//! The VM worker: `vireo-vm --vm-dir DIR` is the one process per running VM that vireod
//! spawns. It builds the VM from `DIR/spec.json`, serves vireod's JSON-lines protocol on
//! `DIR/worker.sock` (`vireo_api::worker`), the console on `DIR/console.sock` and the disk
//! control protocol on `DIR/control.sock`, and records why it ended in `DIR/exit.json`.
//!
//! The VM-building pieces are shared with the foreground `vireo run`: disk opening with format
//! detection ([`image`]), the text control server ([`control`]) and the size parser ([`size`]).
//! The worker stays small: std threads only, a handful of them besides the vCPUs.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod checkpoint_apply;
pub mod console;
pub mod control;
pub mod error;
mod fault_hooks;
pub mod files;
pub mod hotplug;
pub mod image;
pub mod launch;
pub mod metrics;
pub mod migrate;
pub mod move_storage;
pub mod save;
pub mod server;
pub mod size;

pub use error::WorkerError;

/// Written by vireod before the spawn: the `WorkerLaunch`.
pub const SPEC_FILE: &str = "spec.json";
/// Written by the worker as its last act: the `WorkerExit`.
pub const EXIT_FILE: &str = "exit.json";
/// vireod's control connection (JSON lines).
pub const WORKER_SOCKET: &str = "worker.sock";
/// COM1 for one attached client at a time.
pub const CONSOLE_SOCKET: &str = "console.sock";
/// The text disk-control protocol of `vireo run --control` (`vireo control PATH ...`).
pub const CONTROL_SOCKET: &str = "control.sock";
/// Where `Save` writes the VM unless told otherwise (`vm.state`, `memory.bin`).
pub const SAVED_DIR: &str = "saved";

/// Now as Unix time in milliseconds.
pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
