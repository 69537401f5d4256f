//! The VM resource: list, create, show, replace the spec, rename, remove.

use std::collections::HashSet;
use std::path::PathBuf;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use vireo_api::{validate_spec, RenameRequest, Vm, VmSpec, VmState};

use super::St;
use crate::daemon::checkpoints::auto::{self, RiskyOp};
use crate::daemon::http_error::{ApiJson, ApiPath, ApiQuery, HttpError};

pub async fn list(State(d): St) -> Result<Json<Vec<Vm>>, HttpError> {
    Ok(Json(d.store.list()?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateQuery {
    /// The resource pool (id or name) the new VM joins.
    pool: Option<String>,
}

pub async fn create(
    State(d): St,
    ApiQuery(q): ApiQuery<CreateQuery>,
    ApiJson(spec): ApiJson<VmSpec>,
) -> Result<(StatusCode, Json<Vm>), HttpError> {
    let spec = d.storage.confine(&spec)?;
    let vm = crate::daemon::switches::nics::create_vm(&d, &spec, q.pool.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(vm)))
}

pub async fn show(State(d): St, ApiPath(key): ApiPath<String>) -> Result<Json<Vm>, HttpError> {
    Ok(Json(d.find(&key)?))
}

pub async fn put_spec(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiJson(spec): ApiJson<VmSpec>,
) -> Result<Json<Vm>, HttpError> {
    let vm = d.find(&key)?;
    let guard = d.try_lock_vm(&vm)?;
    let vm = d.store.get_by_id(vm.id())?;
    if auto::only_setting_changes(&vm.spec, &spec) {
        return Ok(Json(d.store.update_spec(vm.id(), &spec)?));
    }
    if !matches!(
        vm.state,
        VmState::Off | VmState::Critical { .. } | VmState::Lost { .. }
    ) {
        let what = if vm.state == VmState::Saved {
            "turn it off first (that discards the saved state)"
        } else {
            "turn it off first"
        };
        return Err(HttpError::conflict(format!(
            "cannot change the spec of a VM that is {}; {what}",
            vm.state
        )));
    }
    let spec = d.storage.confine(&spec)?;
    let mut spec = spec;
    // Only a change that would be accepted is worth a checkpoint.
    validate_spec(&spec, &d.limits).map_err(|e| HttpError::from(vireo_api::ApiError::from(e)))?;
    let _taken = if auto::changes_hardware(&vm.spec, &spec) {
        auto::before(&d, vm.id(), RiskyOp::Set, &guard).await?
    } else {
        None
    };
    if _taken.is_some() {
        let now = d.store.get_by_id(vm.id())?;
        spec = auto::follow_moved_disks(&vm.spec, &now.spec, spec);
    }
    let vm = d.store.get_by_id(vm.id())?;
    Ok(Json(
        crate::daemon::switches::nics::update_spec(&d, &vm, &spec).await?,
    ))
}

pub async fn rename(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiJson(req): ApiJson<RenameRequest>,
) -> Result<Json<Vm>, HttpError> {
    let vm = d.find(&key)?;
    let _guard = d.try_lock_vm(&vm)?;
    Ok(Json(d.store.rename(vm.id(), &req.name)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    #[serde(default)]
    delete_disks: bool,
}

pub async fn remove(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> Result<StatusCode, HttpError> {
    let vm = d.find(&key)?;
    let _guard = d.try_lock_vm(&vm)?;
    let vm = d.store.get_by_id(vm.id())?;
    if vm.state.has_worker() {
        return Err(HttpError::conflict(format!(
            "cannot remove a VM that is {}; turn it off first",
            vm.state
        )));
    }
    let disks: Vec<PathBuf> = vm.spec.disks.iter().map(|d| d.path.clone()).collect();
    if q.delete_disks {
        // A disk another VM also names stays: deleting it would break that VM.
        let others = d.store.list()?;
        let shared: HashSet<&PathBuf> = others
            .iter()
            .filter(|o| o.id() != vm.id())
            .flat_map(|o| o.spec.disks.iter().map(|d| &d.path))
            .collect();
        if let Some(p) = disks.iter().find(|p| shared.contains(p)) {
            return Err(HttpError::conflict(format!(
                "disk {} is also used by another VM; remove with delete_disks=false",
                p.display()
            )));
        }
    }
    // A storage move put vireod's checkpoint files in `<DIR>/vireo-checkpoints-<id>/`, which
    // does not go with the VM's folder: found while the records still name them.
    let outside = crate::daemon::migrate::tree::outside_vm_dir(&d, &vm);
    crate::daemon::switches::nics::remove_vm(&d, &vm).await?;
    crate::daemon::migrate::tree::remove_outside(&outside);
    d.disk_locks.release(vm.id());
    d.forget_vm_lock(vm.id());
    d.meters.forget(vm.id());
    if q.delete_disks {
        for p in &disks {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(HttpError::internal(format!(
                        "VM {:?} removed, but its disk {} could not be deleted: {e}",
                        vm.spec.name,
                        p.display()
                    )))
                }
            }
        }
    }
    Ok(StatusCode::NO_CONTENT)
}
