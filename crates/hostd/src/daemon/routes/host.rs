//! `GET /v1/host`.

use axum::extract::State;
use axum::Json;
use vireo_api::{HostInfo, VmState};

use super::St;
use crate::daemon::http_error::HttpError;

pub async fn show(State(d): St) -> Result<Json<HostInfo>, HttpError> {
    let vms = d.store.list()?;
    let running = vms.iter().filter(|v| v.state == VmState::Running).count();
    Ok(Json(HostInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        vms: vms.len() as u32,
        running: running as u32,
        max_vcpus: d.limits.max_vcpus,
        max_memory_bytes: d.limits.max_memory_bytes,
    }))
}
