//! Save and restore through vireod (docs/vm-state.md, "Through vireod"): `POST
//! /vms/{vm}/save` asks the worker to write the VM into `<vm-dir>/saved/` and exit (`saving`,
//! then `saved`); `start` of a saved VM restores from there and deletes the files once the VM
//! runs; `turn-off` of a saved VM discards them; removing the VM removes its folder with them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;
use vireo_api::worker::WorkerReply;
use vireo_api::{transition, Action, Job, JobKind, Vm, VmState};

use super::disk_locks::{self, HeldDisk};
use super::http_error::HttpError;
use super::supervisor::Worker;
use super::worker_client::{save_handing_over, WorkerCallError};
use super::Daemon;

/// The save directory inside a VM's folder (the worker's default for `Save`).
pub const SAVED_DIR: &str = "saved";
/// How long a save may take once the worker has it (memory is copied at disk speed).
const SAVE_LIMIT: Duration = Duration::from_secs(600);

pub fn saved_dir(daemon: &Daemon, id: Uuid) -> PathBuf {
    daemon.store.vm_dir(id).join(SAVED_DIR)
}

/// A complete save is there (its state file is written last).
pub fn has_saved_state(daemon: &Daemon, id: Uuid) -> bool {
    saved_dir(daemon, id).join("vm.state").is_file()
}

/// Deletes the VM's saved state (after a restore ran, or to discard it), and lets go of the
/// disk locks vireod held for it (a restored worker holds its own).
pub fn discard(daemon: &Daemon, id: Uuid) {
    daemon.disk_locks.release(id);
    let dir = saved_dir(daemon, id);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => tracing::info!(vm = %id, "saved state {} deleted", dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(vm = %id, "cannot delete saved state {}: {e}", dir.display()),
    }
}

/// `POST /vms/{vm}/save`: `saving` and a job that completes when the state is on disk and the
/// worker is gone (`saved`). A save the worker refuses fails the job and the VM is as before.
pub async fn save(daemon: &Arc<Daemon>, vm: &Vm) -> Result<Job, HttpError> {
    let _guard = daemon.try_lock_vm(vm)?;
    let vm = daemon.store.get_by_id(vm.id())?;
    let paused = vm.state == VmState::Paused;
    transition(&vm.state, &Action::Save)?;
    let worker = daemon.sup.get(vm.id()).ok_or_else(|| {
        HttpError::conflict(format!(
            "VM {:?} has no worker now (it is ending); retry",
            vm.spec.name
        ))
    })?;
    let vm = daemon.store.set_state(vm.id(), &Action::Save)?;
    let job = match daemon.store.create_job(Some(vm.id()), JobKind::Save) {
        Ok(job) => job,
        Err(e) => {
            let _ = daemon
                .store
                .set_state(vm.id(), &Action::SaveFailed { paused });
            return Err(e.into());
        }
    };
    let d = daemon.clone();
    let job_id = job.id;
    tokio::spawn(async move {
        let outcome = run_save(&d, &worker, job_id, paused).await;
        if let Err(message) = &outcome {
            tracing::warn!(vm = %worker.vm_id, %message, "save failed");
        }
        let _ = d.store.finish_job(job_id, outcome);
    });
    Ok(job)
}

pub(crate) async fn run_save(
    daemon: &Daemon,
    worker: &Worker,
    job: Uuid,
    paused: bool,
) -> Result<(), String> {
    let _ = daemon.store.set_job_progress(job, 10);
    // The worker's disk locks come back with its reply and are kept from there on, so its
    // exit frees none of them (docs/vm-state.md, "Disk locks across a save").
    let mut handed_over = false;
    match save_handing_over(&worker.socket(), SAVE_LIMIT).await {
        Ok((WorkerReply::DisksHandedOver { disks }, files)) if disks.len() == files.len() => {
            let held = disks
                .into_iter()
                .zip(files)
                .map(|(d, file)| HeldDisk {
                    path: d.path,
                    read_only: d.read_only,
                    file,
                })
                .collect();
            daemon.disk_locks.keep(worker.vm_id, held);
            handed_over = true;
        }
        Ok((WorkerReply::DisksHandedOver { disks }, files)) => tracing::warn!(
            vm = %worker.vm_id,
            "save handed over {} files for {} disks; locking them again by path",
            files.len(),
            disks.len()
        ),
        // A worker with nothing to hand over (or an older one).
        Ok((WorkerReply::Ok, _)) => {}
        Err(WorkerCallError::Refused(message)) => {
            // The worker said no and the VM is as it was.
            let _ = daemon
                .store
                .set_state(worker.vm_id, &Action::SaveFailed { paused });
            return Err(message);
        }
        // No answer in time (a large memory), or an odd one: the worker's exit says how it
        // ended.
        Ok((other, _)) => tracing::warn!(vm = %worker.vm_id, "save answered {other:?}"),
        Err(e) => tracing::info!(vm = %worker.vm_id, "save: {e}; waiting for the worker"),
    }
    let _ = daemon.store.set_job_progress(job, 90);
    let Some(end) = worker.exited_within(SAVE_LIMIT).await else {
        return Err(format!(
            "the worker (pid {}) did not end within {}s of the save",
            worker.pid,
            SAVE_LIMIT.as_secs()
        ));
    };
    match end.state {
        Some(VmState::Saved) => {
            if !handed_over {
                // The worker's exit let them go: take them back now rather than at the restore.
                relock(daemon, worker.vm_id);
            }
            Ok(())
        }
        Some(s) => {
            daemon.disk_locks.release(worker.vm_id);
            Err(format!("{}; the VM is {s}", end.message))
        }
        None => {
            daemon.disk_locks.release(worker.vm_id);
            Err(end.message)
        }
    }
}

/// Locks the saved VM `id`'s disks that vireod does not hold yet (`disk_locks::relock`).
fn relock(daemon: &Daemon, id: Uuid) {
    if let Ok(vm) = daemon.store.get_by_id(id) {
        disk_locks::relock(daemon, &vm);
    }
}
