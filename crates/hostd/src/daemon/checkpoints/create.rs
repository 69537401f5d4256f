//! `POST /v1/vms/{vm}/checkpoints`: a job. An off or saved VM is checkpointed in place (a saved
//! VM's state files are linked into the checkpoint). A running or paused VM is captured live
//! by its own worker (`live.rs`) and runs on (or stays paused) from its new children.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;
use vireo_api::{
    validate_name, Action, Checkpoint, CheckpointDisk, JobKind, JobState, Vm, VmSpec, VmState,
};

use super::super::http_error::HttpError;
use super::super::{lifecycle, pause, save, Daemon};
use super::{disks, fault_point, state_dir};
use crate::checkpoint_store::{Head, Intent, Top};

/// How long a capture's save or restart job may take.
const STEP_LIMIT: Duration = Duration::from_secs(600);

/// The default name, like Hyper-V's (`<vm> - <date time>`) in the characters names allow:
/// `<vm>-YYYYMMDD-HHMMSS` (UTC; the VM's part shortened to keep within 64).
fn default_name(vm: &Vm) -> String {
    let vm_part: String = vm.spec.name.chars().take(48).collect();
    format!("{vm_part}-{}", utc_stamp(crate::store::now_ms()))
}

/// `YYYYMMDD-HHMMSS` (UTC) of Unix time `ms`, in the characters checkpoint names allow.
pub fn utc_stamp(ms: i64) -> String {
    let secs = (ms.max(0) / 1000) as u64;
    let (d, s) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970 (Howard Hinnant's algorithm).
    let z = d as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Checks the request; returns the name to use.
pub(super) fn check(daemon: &Daemon, vm: &Vm, name: Option<String>) -> Result<String, HttpError> {
    let name = match name {
        Some(n) => {
            validate_name("name", &n).map_err(|e| HttpError::from(vireo_api::ApiError::from(e)))?;
            n
        }
        None => default_name(vm),
    };
    if daemon.store.find_checkpoint(vm.id(), &name)?.is_some() {
        return Err(HttpError::conflict(format!(
            "VM {:?} already has a checkpoint named {name:?}; choose another name",
            vm.spec.name
        )));
    }
    disks::checkpointed(&vm.spec)
        .map_err(|m| HttpError::new(vireo_api::ApiErrorCode::Invalid, m))?;
    match vm.state {
        VmState::Off | VmState::Saved | VmState::Running | VmState::Paused => Ok(name),
        ref s => Err(HttpError::conflict(format!(
            "cannot checkpoint VM {:?} while it is {s}; wait until it is off, running, paused \
             or saved",
            vm.spec.name
        ))),
    }
}

pub async fn create(
    daemon: &Arc<Daemon>,
    vm: &Vm,
    name: Option<String>,
) -> Result<vireo_api::Job, HttpError> {
    let vm = daemon.store.get_by_id(vm.id())?;
    super::refuse_during_move(daemon, &vm)?;
    let name = check(daemon, &vm, name)?;
    let live = vm.state.has_worker();
    // An off or saved VM is locked from here to the end; a running one is locked by each step.
    let guard = if live {
        None
    } else {
        Some(daemon.try_lock_vm(&vm)?)
    };
    let job = daemon
        .store
        .create_job(Some(vm.id()), JobKind::Checkpoint)?;
    let d = daemon.clone();
    let job_id = job.id;
    tokio::spawn(async move {
        let outcome = if live {
            capture(&d, &vm, &name, job_id, true).await.map(|_| ())
        } else {
            let r = in_place(&d, vm.id(), &name, job_id, false)
                .await
                .map(|_| ());
            drop(guard);
            r
        };
        if let Err(m) = &outcome {
            tracing::warn!(vm = %vm.id(), "checkpoint failed: {m}");
        }
        let _ = d.store.finish_job(job_id, outcome);
    });
    Ok(job)
}

/// Waits for a job of this daemon to end.
pub async fn wait_job(daemon: &Daemon, id: Uuid) -> Result<(), String> {
    let until = tokio::time::Instant::now() + STEP_LIMIT;
    while tokio::time::Instant::now() < until {
        match daemon.store.get_job(id) {
            Ok(j) if j.state == JobState::Completed => return Ok(()),
            Ok(j) if j.state != JobState::Running => {
                return Err(j.error.unwrap_or_else(|| format!("job {id} {:?}", j.state)))
            }
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "job {id} did not end within {}s",
        STEP_LIMIT.as_secs()
    ))
}

/// A running or paused VM: capture its state and memory, checkpoint it, let it go on. With
/// `resume` the VM's own worker takes it live (`live.rs`: one short pause, same worker).
/// Without (apply with save_current, which wants the VM stopped anyway) it is saved (the
/// worker pauses, writes `saved/`, exits) and checkpointed as a saved VM; it stays `saved`.
pub async fn capture(
    daemon: &Arc<Daemon>,
    vm: &Vm,
    name: &str,
    job: Uuid,
    resume: bool,
) -> Result<Checkpoint, String> {
    if resume {
        // The VM keeps its worker: one pause, no restart (live.rs).
        let _g = daemon.lock_vm(vm.id()).await;
        return super::live::capture(daemon, vm.id(), name, job, false).await;
    }
    let was_paused = vm.state == VmState::Paused;
    let save_job = save::save(daemon, vm).await.map_err(|e| e.body.message)?;
    wait_job(daemon, save_job.id)
        .await
        .map_err(|m| format!("capturing the VM's state: {m}"))?;
    let _ = daemon.store.set_job_progress(job, 50);
    let made = {
        let _g = daemon.lock_vm(vm.id()).await;
        in_place(daemon, vm.id(), name, job, false).await
    };
    let _ = daemon.store.set_job_progress(job, 80);
    if !resume {
        return made;
    }
    let restarted = restart(daemon, vm.id(), was_paused).await;
    match (made, restarted) {
        (Ok(cp), Ok(())) => Ok(cp),
        (Ok(_), Err(m)) => Err(format!(
            "checkpoint taken, but the VM did not continue: {m}"
        )),
        (Err(m), Ok(())) => Err(format!("{m}; the VM continues as before")),
        (Err(m), Err(r)) => Err(format!("{m}; and the VM did not continue: {r}")),
    }
}

/// Starts the saved VM again (a restore) and pauses it again if it was paused.
async fn restart(daemon: &Arc<Daemon>, id: Uuid, paused: bool) -> Result<(), String> {
    let vm = daemon.store.get_by_id(id).map_err(|e| e.to_string())?;
    let start = lifecycle::start(daemon, &vm)
        .await
        .map_err(|e| e.body.message)?;
    wait_job(daemon, start.id).await?;
    if paused {
        let vm = daemon.store.get_by_id(id).map_err(|e| e.to_string())?;
        pause::worker_action(daemon, &vm, Action::Pause)
            .await
            .map_err(|e| e.body.message)?;
    }
    Ok(())
}

/// Checkpoints a VM that has no worker (off or saved); the caller holds the VM's lock.
pub async fn in_place(
    daemon: &Arc<Daemon>,
    id: Uuid,
    name: &str,
    job: Uuid,
    automatic: bool,
) -> Result<Checkpoint, String> {
    let vm = daemon.store.get_by_id(id).map_err(|e| e.to_string())?;
    if vm.state.has_worker() {
        return Err(format!("VM {:?} is {} again", vm.spec.name, vm.state));
    }
    // A saved VM's disks get children here; vireod's own locks on them step aside meanwhile.
    let _aside = crate::daemon::disk_locks::set_aside(daemon, id);
    let head = daemon
        .store
        .checkpoint_head(id)
        .map_err(|e| e.to_string())?;
    let cp_id = Uuid::new_v4();
    let has_state = vm.state == VmState::Saved && save::has_saved_state(daemon, id);
    let disks_now: Vec<(String, std::path::PathBuf)> = disks::checkpointed(&vm.spec)?
        .into_iter()
        .map(|d| (d.serial.clone().unwrap_or_default(), d.path.clone()))
        .collect();
    let plan: Vec<(String, std::path::PathBuf, std::path::PathBuf)> = disks_now
        .into_iter()
        .map(|(serial, frozen)| {
            let child = super::child_path(daemon, id, &serial, cp_id, &frozen);
            (serial, frozen, child)
        })
        .collect();
    let sdir = state_dir(daemon, id, cp_id);
    let intent = Intent::Create {
        checkpoint: cp_id,
        children: plan.iter().map(|p| p.2.clone()).collect(),
        state_dir: sdir.clone(),
        live: None,
    };
    super::begin_intent(daemon, &vm, &intent)?;
    fault_point("create-intent");
    let d = daemon.clone();
    let saved = save::saved_dir(daemon, id);
    let files = tokio::task::spawn_blocking(move || -> Result<Vec<CheckpointDisk>, String> {
        if has_state {
            disks::link_state(&saved, &sdir)?;
        }
        let mut out = Vec::new();
        for (serial, frozen, child) in &plan {
            let parent_file = disks::parent_of(frozen)?;
            disks::make_child(frozen, child)?;
            fault_point("create-child");
            out.push(CheckpointDisk {
                serial: serial.clone(),
                frozen: frozen.clone(),
                parent_file,
            });
        }
        Ok(out)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let _ = d.store.set_job_progress(job, 60);
    let cp_disks = match files {
        Ok(f) => f,
        Err(m) => {
            super::recover::roll_back(&d, id, &intent);
            return Err(m);
        }
    };
    let cp = Checkpoint {
        id: cp_id,
        vm_id: id,
        name: name.to_owned(),
        parent: head.current,
        created_at: crate::store::now_ms(),
        spec: vm.spec.clone(),
        disks: cp_disks,
        has_state,
        current: true,
        automatic,
        capture: None,
    };
    let cp = commit(&d, id, &cp, &vm.spec, &head, &intent)?;
    tracing::info!(vm = %id, checkpoint = %cp_id, name, "checkpoint created");
    Ok(cp)
}

/// One transaction: the checkpoint, the VM's spec on the children, the new head; then the
/// intent goes. `spec` is the VM's spec before (its disks on the frozen files).
pub fn commit(
    d: &Arc<Daemon>,
    id: Uuid,
    cp: &Checkpoint,
    spec: &VmSpec,
    head: &Head,
    intent: &Intent,
) -> Result<Checkpoint, String> {
    let mut spec = spec.clone();
    let mut tops = head.tops.clone();
    for cd in &cp.disks {
        let child = super::child_path(d, id, &cd.serial, cp.id, &cd.frozen);
        for disk in spec.disks.iter_mut() {
            if disk.serial.as_deref() == Some(&cd.serial) {
                disk.path = child.clone();
            }
        }
        tops.insert(
            cd.serial.clone(),
            Top {
                file: child,
                parent: cd.frozen.clone(),
            },
        );
    }
    let new_head = Head {
        current: Some(cp.id),
        tops,
    };
    match d.store.commit_checkpoint_create(cp, &spec, &new_head) {
        Ok(true) => {}
        Ok(false) => {
            super::recover::roll_back(d, id, intent);
            return Err(format!(
                "VM {:?} already has a checkpoint named {:?}; choose another name",
                spec.name, cp.name
            ));
        }
        Err(e) => {
            super::recover::roll_back(d, id, intent);
            return Err(e.to_string());
        }
    }
    fault_point("create-commit");
    let _ = d.store.clear_checkpoint_intent(id);
    Ok(cp.clone())
}
