//! A VM's disks: list, add, remove (`/v1/vms/{vm}/disks`). On a VM that is off (or critical)
//! only the spec changes; on a running or paused VM the worker hot-adds or hot-removes the
//! disk first (`AddDisk`/`RemoveDisk`, docs/vmm.md "Disk hot-plug") and the spec follows once
//! it said yes, so a refused request changes neither. Other states: 409.
//!
//! The spec's `disks` stay in slot order: a hot-added disk goes where the worker says (its
//! index, the guest's disk index after a rescan), so the next start numbers them the same.

use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use vireo_api::worker::{WorkerOp, WorkerReply, WORKER_DISK_SLOTS};
use vireo_api::{validate_spec, ApiErrorCode, DiskSpec, Vm, VmIdentity, VmState};

use super::St;
use crate::daemon::checkpoints::auto::{self, RiskyOp};
use crate::daemon::http_error::{ApiJson, ApiPath, HttpError};
use crate::daemon::worker_client::{call_once, WorkerCallError};
use crate::daemon::Daemon;

/// `GET /v1/vms/{vm}/disks`: the spec's disks, in index order.
pub async fn list(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<Vec<DiskSpec>>, HttpError> {
    Ok(Json(d.find(&key)?.spec.disks))
}

/// How a request may change the VM's disks in its current state.
enum Mode {
    SpecOnly,
    Live,
}

fn mode(vm: &Vm, verb: &str) -> Result<Mode, HttpError> {
    match vm.state {
        VmState::Off | VmState::Critical { .. } | VmState::Lost { .. } => Ok(Mode::SpecOnly),
        VmState::Running | VmState::Paused => Ok(Mode::Live),
        ref s => Err(HttpError::conflict(format!(
            "cannot {verb} a disk while VM {:?} is {s}; wait until it is running or off",
            vm.spec.name
        ))),
    }
}

fn invalid(message: String) -> HttpError {
    HttpError::new(ApiErrorCode::Invalid, message)
}

/// The disk's path checked like create's (inside a storage root, symlinks resolved), and the
/// file must exist now.
fn checked_path(d: &Daemon, path: &Path) -> Result<PathBuf, HttpError> {
    if !path.is_absolute() {
        return Err(invalid(format!(
            "disk path {} is not absolute",
            path.display()
        )));
    }
    let resolved = d.storage.confine_path("disk", path)?;
    match std::fs::metadata(&resolved) {
        Ok(m) if !m.is_dir() => Ok(resolved),
        Ok(_) => Err(invalid(format!(
            "disk {} is a directory, not a disk image",
            path.display()
        ))),
        Err(e) => Err(invalid(format!("disk {}: {e}", path.display()))),
    }
}

/// `POST /v1/vms/{vm}/disks`: 201 with the VM.
pub async fn add(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiJson(disk): ApiJson<DiskSpec>,
) -> Result<(StatusCode, Json<Vm>), HttpError> {
    let vm = d.find(&key)?;
    let guard = d.try_lock_vm(&vm)?;
    let vm = d.store.get_by_id(vm.id())?;
    mode(&vm, "add")?;
    let mut disk = disk;
    disk.path = checked_path(&d, &disk.path)?;
    let _taken = auto::before(&d, vm.id(), RiskyOp::DiskAdd, &guard).await?;
    // The checkpoint put the VM's disks on new files (and a live one may have changed state).
    let vm = d.store.get_by_id(vm.id())?;
    let mode = mode(&vm, "add")?;
    let name = &vm.spec.name;
    if let Some((i, other)) = vm
        .spec
        .disks
        .iter()
        .enumerate()
        .find(|(_, o)| same_file(&o.path, &disk.path))
    {
        return Err(HttpError::conflict(format!(
            "disk {} is already attached to VM {name:?} as disk {i}{}",
            disk.path.display(),
            other
                .serial
                .as_ref()
                .map(|s| format!(" (serial {s})"))
                .unwrap_or_default()
        )));
    }
    let mut spec = vm.spec.clone();
    spec.disks.push(disk);
    validate_spec(&spec, &d.limits).map_err(|e| invalid(e.to_string()))?;
    if matches!(mode, Mode::SpecOnly) {
        let vm = d.store.update_spec(vm.id(), &spec)?;
        return Ok((StatusCode::CREATED, Json(vm)));
    }
    if vm.spec.disks.len() >= WORKER_DISK_SLOTS {
        return Err(HttpError::conflict(format!(
            "VM {name:?} has no free disk slot (all {} are in use; {WORKER_DISK_SLOTS} are \
             reserved at start); remove a disk first or add it while the VM is off",
            vm.spec.disks.len()
        )));
    }
    // The serial is the disk's identity from now on; the worker gets it with the disk.
    VmIdentity::assign(vm.id(), &mut spec, || {
        unreachable!("a stored spec's NICs all have MACs")
    });
    let disk = spec.disks.pop().expect("pushed above");
    let index = match call_worker(&d, &vm, WorkerOp::AddDisk { disk: disk.clone() }, "add").await? {
        WorkerReply::DiskAdded { index } => index as usize,
        other => {
            return Err(HttpError::internal(format!(
                "the worker of VM {name:?} answered add disk with {other:?}"
            )))
        }
    };
    let serial = disk.serial.clone().unwrap_or_default();
    spec.disks.insert(index.min(spec.disks.len()), disk);
    match d.store.update_spec(vm.id(), &spec) {
        Ok(vm) => Ok((StatusCode::CREATED, Json(vm))),
        Err(e) => {
            // Keep the worker and the store agreeing: take the disk out again.
            let undo = WorkerOp::RemoveDisk { serial };
            if let Err(u) = call_worker(&d, &vm, undo, "remove").await {
                tracing::error!("undoing a hot add on VM {name:?}: {}", u.body.message);
            }
            Err(e.into())
        }
    }
}

/// `DELETE /v1/vms/{vm}/disks/{disk}` (`disk`: a serial, or an index): 200 with the VM.
pub async fn remove(
    State(d): St,
    ApiPath((key, which)): ApiPath<(String, String)>,
) -> Result<Json<Vm>, HttpError> {
    let vm = d.find(&key)?;
    let guard = d.try_lock_vm(&vm)?;
    let vm = d.store.get_by_id(vm.id())?;
    let index = disk_index(&vm, &which)?;
    mode(&vm, "remove")?;
    let _taken = auto::before(&d, vm.id(), RiskyOp::DiskRemove, &guard).await?;
    let vm = d.store.get_by_id(vm.id())?;
    let mode = mode(&vm, "remove")?;
    let mut spec = vm.spec.clone();
    let disk = spec.disks.remove(index);
    if matches!(mode, Mode::Live) {
        let Some(serial) = disk.serial.clone() else {
            return Err(HttpError::internal(format!(
                "disk {index} of VM {:?} has no serial",
                vm.spec.name
            )));
        };
        match call_worker(&d, &vm, WorkerOp::RemoveDisk { serial }, "remove").await? {
            WorkerReply::Ok => {}
            other => {
                return Err(HttpError::internal(format!(
                    "the worker of VM {:?} answered remove disk with {other:?}",
                    vm.spec.name
                )))
            }
        }
    }
    Ok(Json(d.store.update_spec(vm.id(), &spec)?))
}

/// `which` (a serial, or an index) as the disk's index in the VM's spec.
pub(super) fn disk_index(vm: &Vm, which: &str) -> Result<usize, HttpError> {
    let disks = &vm.spec.disks;
    disks
        .iter()
        .position(|x| x.serial.as_deref() == Some(which))
        .or_else(|| which.parse::<usize>().ok().filter(|&i| i < disks.len()))
        .ok_or_else(|| {
            HttpError::new(
                ApiErrorCode::NotFound,
                format!(
                    "VM {:?} has no disk {which:?} (give a serial or an index below {})",
                    vm.spec.name,
                    disks.len()
                ),
            )
        })
}

/// One op on the VM's worker; a refusal is 422 with the worker's reason (the checks above
/// caught the conflicts, so what is left is the file itself), no answer is 500.
async fn call_worker(
    d: &Daemon,
    vm: &Vm,
    op: WorkerOp,
    verb: &str,
) -> Result<WorkerReply, HttpError> {
    let name = &vm.spec.name;
    let worker = d.sup.get(vm.id()).ok_or_else(|| {
        HttpError::conflict(format!(
            "VM {name:?} has no worker now (it is ending); retry"
        ))
    })?;
    match call_once(&worker.socket(), op).await {
        Ok(reply) => Ok(reply),
        Err(WorkerCallError::Refused(message)) => Err(invalid(format!(
            "VM {name:?} could not {verb} the disk: {message}; nothing changed"
        ))),
        Err(e) => Err(HttpError::internal(format!(
            "the worker of VM {name:?} did not answer {verb} disk: {e}"
        ))),
    }
}

/// The same file, however named (the stored paths are resolved already when roots are set).
fn same_file(a: &Path, b: &Path) -> bool {
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    real(a) == real(b)
}
