//! The handlers, one module per resource; `router.rs` maps them onto paths.

pub mod checkpoints;
pub mod console;
pub mod disk_resize;
pub mod disks;
pub mod gateways;
pub mod host;
pub mod jobs;
pub mod metrics;
pub mod nics;
pub mod policies;
pub mod pools;
pub mod power;
pub mod switches;
pub mod uplink_mirror;
pub mod vms;

use std::sync::Arc;

use axum::extract::State;

use super::Daemon;

pub type St = State<Arc<Daemon>>;
