//! `POST /v1/vms/{vm}/checkpoints/{cp}/apply`: the VM goes back to the checkpoint. Its disks
//! become new differencing children of the checkpoint's frozen files (so the checkpoint can be
//! applied again, as in Hyper-V), its spec becomes the checkpoint's (memory, disks, NICs of
//! that moment; the VM keeps its current name), and a checkpoint with state leaves it `saved`
//! (a start continues from that moment), one without leaves it `off`. The VM's own files of
//! before that no checkpoint froze are deleted: that state is discarded, unless
//! `save_current` checkpointed it first.

use std::sync::Arc;

use uuid::Uuid;
use vireo_api::{ApplyCheckpointRequest, Checkpoint, JobKind, Vm, VmState};

use super::super::http_error::HttpError;
use super::super::{lifecycle, save, Daemon};
use super::auto::{self, RiskyOp};
use super::{disks, fault_point, is_ours};
use crate::checkpoint_store::{Head, Intent, Top};

pub async fn apply(
    daemon: &Arc<Daemon>,
    vm: &Vm,
    key: &str,
    req: ApplyCheckpointRequest,
) -> Result<vireo_api::Job, HttpError> {
    let vm = daemon.store.get_by_id(vm.id())?;
    super::refuse_during_move(daemon, &vm)?;
    let cp = super::find(daemon, &vm, key)?;
    if req.keep_running {
        precheck_keep_running(&vm, &cp, &req)?;
    }
    match vm.state {
        VmState::Running | VmState::Paused if req.keep_running => {}
        VmState::Off | VmState::Saved | VmState::Critical { .. } | VmState::Lost { .. } => {}
        VmState::Running | VmState::Paused if req.save_current || req.stop => {}
        VmState::Running | VmState::Paused => {
            return Err(HttpError::conflict(format!(
                "VM {:?} is {}: applying checkpoint {:?} would discard its current state; \
                 stop it first, or pass save_current=true (checkpoint it first) or stop=true \
                 (turn it off)",
                vm.spec.name, vm.state, cp.name
            )))
        }
        ref s => {
            return Err(HttpError::conflict(format!(
                "cannot apply a checkpoint to VM {:?} while it is {s}; wait until it is off, \
                 running, paused or saved",
                vm.spec.name
            )))
        }
    }
    if req.save_current && vm.state.has_worker() {
        disks::checkpointed(&vm.spec)
            .map_err(|m| HttpError::new(vireo_api::ApiErrorCode::Invalid, m))?;
    } else {
        // Refused now rather than as the job's error: what would block the automatic
        // checkpoint is known before it starts.
        auto::precheck(daemon, vm.id(), RiskyOp::Apply)?;
    }
    let job = daemon
        .store
        .create_job(Some(vm.id()), JobKind::Checkpoint)?;
    let d = daemon.clone();
    let job_id = job.id;
    tokio::spawn(async move {
        let outcome = run(&d, &vm, &cp, req, job_id).await;
        if let Err(m) = &outcome {
            tracing::warn!(vm = %vm.id(), "apply failed: {m}");
        }
        let _ = d.store.finish_job(job_id, outcome);
    });
    Ok(job)
}

async fn run(
    d: &Arc<Daemon>,
    vm: &Vm,
    cp: &Checkpoint,
    req: ApplyCheckpointRequest,
    job: Uuid,
) -> Result<(), String> {
    // save_current keeps the current state already (as `<vm>-before-<cp>`).
    let _taken = if req.save_current && vm.state.has_worker() {
        None
    } else {
        // Before a stop too, so the running VM's state is what the checkpoint keeps; live,
        // so the VM is still running should the checkpoint fail.
        let g = d.lock_vm(vm.id()).await;
        auto::before(d, vm.id(), RiskyOp::Apply, &g)
            .await
            .map_err(|e| e.body.message)?
    };
    let vm = &d.store.get_by_id(vm.id()).map_err(|e| e.to_string())?;
    if req.keep_running {
        let _g = d.lock_vm(vm.id()).await;
        return super::apply_live::apply(d, vm.id(), cp, job).await;
    }
    if vm.state.has_worker() {
        if req.save_current {
            let name: String = format!("{}-before-{}", vm.spec.name, cp.name)
                .chars()
                .take(64)
                .collect();
            super::create::capture(d, vm, &name, job, false).await?;
        } else {
            lifecycle::turn_off(d, vm)
                .await
                .map_err(|e| e.body.message)?;
        }
    }
    let _g = d.lock_vm(vm.id()).await;
    in_place(d, vm.id(), cp).await
}

/// `keep_running` is refused up front (409, nothing changed) where it cannot be honoured:
/// never a silent fall back to a restart.
fn precheck_keep_running(
    vm: &Vm,
    cp: &Checkpoint,
    req: &ApplyCheckpointRequest,
) -> Result<(), HttpError> {
    if req.save_current || req.stop {
        return Err(HttpError::new(
            vireo_api::ApiErrorCode::Invalid,
            "keep_running reverts the VM in its running worker; it cannot be combined with              save_current or stop (which restart it): pass one of them",
        ));
    }
    if !matches!(vm.state, VmState::Running | VmState::Paused) {
        return Err(HttpError::conflict(format!(
            "VM {:?} is {}: keep_running applies a checkpoint to a running or paused VM;              apply it without keep_running",
            vm.spec.name, vm.state
        )));
    }
    match super::apply_live::obstacle(&vm.spec, cp) {
        Some(why) => Err(HttpError::conflict(why)),
        None => Ok(()),
    }
}

/// Applies `cp` to a VM without a worker; the caller holds the VM's lock.
pub async fn in_place(d: &Arc<Daemon>, id: Uuid, cp: &Checkpoint) -> Result<(), String> {
    // A saved VM's disks change here; vireod's own locks on them step aside meanwhile.
    let _aside = crate::daemon::disk_locks::set_aside(d, id);
    let vm = d.store.get_by_id(id).map_err(|e| e.to_string())?;
    if vm.state.has_worker() {
        return Err(format!("VM {:?} is {} again", vm.spec.name, vm.state));
    }
    let op = Uuid::new_v4();
    let plan: Vec<(String, std::path::PathBuf, std::path::PathBuf)> = cp
        .disks
        .iter()
        .map(|x| {
            let child = super::child_path(d, id, &x.serial, op, &x.frozen);
            (x.serial.clone(), x.frozen.clone(), child)
        })
        .collect();
    let discard = discarded_files(d, &vm)?;
    let staged = cp.has_state.then(|| d.store.vm_dir(id).join("saved.apply"));
    let intent = Intent::Apply {
        checkpoint: cp.id,
        children: plan.iter().map(|p| p.2.clone()).collect(),
        discard,
        staged: staged.clone(),
        live: false,
    };
    super::begin_intent(d, &vm, &intent)?;
    fault_point("apply-intent");
    let from = super::state_dir(d, id, cp.id);
    let plan2 = plan.clone();
    let made = tokio::task::spawn_blocking(move || -> Result<(), String> {
        for (_, frozen, child) in &plan2 {
            disks::make_child(frozen, child)?;
            fault_point("apply-child");
        }
        if let Some(s) = &staged {
            disks::remove(s);
            disks::link_state(&from, s)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    if let Err(m) = made {
        super::recover::roll_back(d, id, &intent);
        return Err(m);
    }
    let mut spec = cp.spec.clone();
    let mut tops = std::collections::BTreeMap::new();
    for (serial, frozen, child) in &plan {
        for x in spec.disks.iter_mut() {
            if x.serial.as_deref() == Some(serial.as_str()) {
                x.path = child.clone();
            }
        }
        tops.insert(
            serial.clone(),
            Top {
                file: child.clone(),
                parent: frozen.clone(),
            },
        );
    }
    let state = if cp.has_state {
        VmState::Saved
    } else {
        VmState::Off
    };
    let head = Head {
        current: Some(cp.id),
        tops,
    };
    if let Err(e) = d
        .store
        .commit_checkpoint_apply(id, &spec, Some(&state), &head)
    {
        super::recover::roll_back(d, id, &intent);
        return Err(e.to_string());
    }
    fault_point("apply-commit");
    finish(d, id, &intent);
    tracing::info!(vm = %id, checkpoint = %cp.id, "checkpoint applied");
    Ok(())
}

/// The clean-up a committed apply owes: the staged state becomes the VM's saved state (or
/// an old saved state goes), the VM's discarded files go, the intent goes.
pub fn finish(d: &Daemon, id: Uuid, intent: &Intent) {
    let Intent::Apply {
        discard,
        staged,
        live,
        ..
    } = intent
    else {
        return;
    };
    let saved = save::saved_dir(d, id);
    match staged {
        // Applied in the running worker: the VM's saved state (if any) is not this apply's.
        None if *live => {}
        Some(s) if s.join("vm.state").is_file() => {
            disks::remove(&saved);
            if let Err(e) = std::fs::rename(s, &saved) {
                tracing::error!(vm = %id, "cannot move {} to {}: {e}", s.display(), saved.display());
                return;
            }
        }
        // Moved already (a finish cut short after the rename).
        Some(_) => {}
        None => disks::remove(&saved),
    }
    let used = super::recover::files_in_use(d, id);
    for f in discard {
        if is_ours(d, id, f) && !used.contains(f) {
            disks::remove(f);
        }
    }
    let _ = d.store.clear_checkpoint_intent(id);
}

/// The VM's own disk files that an apply deletes: the tops it runs on that vireod made and no
/// checkpoint froze (their data is the state being discarded).
pub(super) fn discarded_files(d: &Daemon, vm: &Vm) -> Result<Vec<std::path::PathBuf>, String> {
    let id = vm.id();
    let head = d.store.checkpoint_head(id).map_err(|e| e.to_string())?;
    let frozen: std::collections::HashSet<_> = d
        .store
        .list_checkpoints(id)
        .map_err(|e| e.to_string())?
        .iter()
        .flat_map(|c| c.disks.iter().map(|x| x.frozen.clone()))
        .collect();
    Ok(vm
        .spec
        .disks
        .iter()
        .filter(|x| {
            head.tops.values().any(|t| t.file == x.path)
                && is_ours(d, id, &x.path)
                && !frozen.contains(&x.path)
        })
        .map(|x| x.path.clone())
        .collect())
}
