//! The switch process: `vireo-switch --dir DIR` runs one virtual switch for vireod. It builds a
//! `vireo_vswitch` runtime from `DIR/switch.json` (`vireo_api::switch::SwitchLaunch`), attaches
//! the host ports its kind implies, a vhost-user socket per VM NIC and host interfaces by name,
//! and serves vireod's JSON-lines protocol (`vireo_api::switch`) on `DIR/switch.sock`.
//!
//! It is a process of its own so that VM traffic keeps flowing while vireod restarts: nothing
//! ties its life to its parent; it ends on `Shutdown`, SIGTERM or SIGINT (see docs/switchd.md).

pub mod error;
pub mod files;
pub mod launch;
pub mod meters;
pub mod ports;
pub mod server;
pub mod signals;

pub use error::SwitchdError;

/// Written by vireod before the spawn: the `SwitchLaunch`.
pub const LAUNCH_FILE: &str = "switch.json";
/// vireod's control connection (JSON lines).
pub const SWITCH_SOCKET: &str = "switch.sock";
