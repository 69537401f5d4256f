//! The live capture of a running or paused VM (docs/checkpoints.md, "Live capture"): the VM's
//! own worker writes the state and memory and puts each disk on its new child in one pause
//! (`WorkerOp::Checkpoint`); vireod plans the files, records the intent, and commits.
//!
//! Crash safety: the intent (prepared) carries the whole checkpoint as it will be committed.
//! When the outcome is unknown (vireod restarted, the worker died or did not answer), `settle`
//! decides from what exists:
//! - a live worker: wait until it no longer checkpoints (`Status.checkpointing`), then ask
//!   which files its disks use (`Metrics`): on the children → commit; on the old files → the
//!   worker undid its part → roll back;
//! - no worker (killed): `vm.state` in the checkpoint's folder and every child valid → the
//!   worker got past its durable point (the frozen files have not been written since the
//!   pause, whatever the guest did later went into the children) → commit; else roll back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;
use vireo_api::worker::{CheckpointChild, WorkerOp, WorkerReply};
use vireo_api::{Checkpoint, CheckpointCapture, CheckpointDisk};

use super::super::worker_client::{WorkerCallError, WorkerConn};
use super::super::Daemon;
use super::{disks, fault_point, state_dir};
use crate::checkpoint_store::Intent;

/// How long the worker's checkpoint may take (memory is written while the guest runs).
pub const CAPTURE_LIMIT: Duration = Duration::from_secs(600);
/// The record of the capture beside the state (`Checkpoint::capture`).
pub const CAPTURE_FILE: &str = "capture.json";

/// Captures the running or paused VM `id` as checkpoint `name`; the caller holds its lock.
pub async fn capture(
    d: &Arc<Daemon>,
    id: Uuid,
    name: &str,
    job: Uuid,
    automatic: bool,
) -> Result<Checkpoint, String> {
    let vm = d.store.get_by_id(id).map_err(|e| e.to_string())?;
    if !vm.state.has_worker() {
        return Err(format!("VM {:?} is {} now", vm.spec.name, vm.state));
    }
    let worker = d
        .sup
        .get(id)
        .ok_or_else(|| format!("VM {:?} has no worker now; retry", vm.spec.name))?;
    let head = d.store.checkpoint_head(id).map_err(|e| e.to_string())?;
    let cp_id = Uuid::new_v4();
    let planned: Vec<(String, PathBuf)> = disks::checkpointed(&vm.spec)?
        .into_iter()
        .map(|d| (d.serial.clone().unwrap_or_default(), d.path.clone()))
        .collect();
    let sdir = state_dir(d, id, cp_id);
    let plan = tokio::task::spawn_blocking({
        let d = d.clone();
        move || -> Result<Vec<(CheckpointDisk, PathBuf)>, String> {
            planned
                .into_iter()
                .map(|(serial, frozen)| {
                    // The worker has the file open (locked): read its header without a lock.
                    let parent_file = disks::parent_of_in_use(&frozen)?;
                    let child = super::child_path(&d, id, &serial, cp_id, &frozen);
                    Ok((
                        CheckpointDisk {
                            serial,
                            frozen,
                            parent_file,
                        },
                        child,
                    ))
                })
                .collect()
        }
    })
    .await
    .map_err(|e| e.to_string())??;
    let cp = Checkpoint {
        id: cp_id,
        vm_id: id,
        name: name.to_owned(),
        parent: head.current,
        created_at: crate::store::now_ms(),
        spec: vm.spec.clone(),
        disks: plan.iter().map(|p| p.0.clone()).collect(),
        has_state: true,
        current: true,
        automatic,
        capture: None,
    };
    let intent = Intent::Create {
        checkpoint: cp_id,
        children: plan.iter().map(|p| p.1.clone()).collect(),
        state_dir: sdir.clone(),
        live: Some(Box::new(cp.clone())),
    };
    super::begin_intent(d, &vm, &intent)?;
    fault_point("create-intent");
    let _ = d.store.set_job_progress(job, 20);
    let op = WorkerOp::Checkpoint {
        dir: sdir.clone(),
        children: plan
            .iter()
            .map(|(cd, child)| CheckpointChild {
                serial: cd.serial.clone(),
                path: child.clone(),
            })
            .collect(),
    };
    let answer = match WorkerConn::connect(&worker.socket()).await {
        Ok(mut conn) => conn.call_within(op, CAPTURE_LIMIT).await,
        Err(e) => Err(e),
    };
    let _ = d.store.set_job_progress(job, 80);
    match answer {
        Ok(WorkerReply::Checkpointed(r)) => {
            // The worker is on the children; nothing committed yet (settle commits).
            fault_point("create-answered");
            let capture = CheckpointCapture {
                live: true,
                pause_us: r.pause_us,
                total_ms: r.total_ms,
            };
            write_capture(&sdir, &capture);
            let mut cp = super::create::commit(d, id, &cp, &vm.spec, &head, &intent)?;
            cp.capture = Some(capture);
            tracing::info!(
                vm = %id, checkpoint = %cp_id, name,
                "checkpoint taken live: guest paused {:.1} ms, {} ms in all",
                r.pause_us as f64 / 1e3, r.total_ms
            );
            Ok(cp)
        }
        Err(WorkerCallError::Refused(m)) => {
            // The worker undid its part: nothing of the checkpoint exists.
            super::recover::roll_back(d, id, &intent);
            Err(format!("the worker could not take the checkpoint: {m}"))
        }
        Ok(other) => {
            let m = format!("the worker answered the checkpoint with {other:?}");
            settle(d, id, &intent).await?;
            Err(m)
        }
        Err(e) => {
            // The worker died or did not answer: what it did decides (module docs).
            let committed = settle(d, id, &intent).await?;
            if committed {
                let cp = find_committed(d, id, cp_id)?;
                return Err(format!(
                    "the worker ended during the checkpoint ({e}); the checkpoint {:?} was \
                     kept (its state was complete), the VM is {}",
                    cp.name,
                    d.store
                        .get_by_id(id)
                        .map(|v| v.state.to_string())
                        .unwrap_or_default()
                ));
            }
            Err(format!(
                "the worker ended during the checkpoint ({e}); nothing of it was kept"
            ))
        }
    }
}

fn find_committed(d: &Daemon, id: Uuid, cp: Uuid) -> Result<Checkpoint, String> {
    d.store
        .list_checkpoints(id)
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|c| c.id == cp)
        .ok_or_else(|| format!("checkpoint {cp} is missing after its commit"))
}

/// The capture's record beside the state (best effort: a checkpoint without it is complete).
fn write_capture(dir: &Path, c: &CheckpointCapture) {
    let text = serde_json::to_vec(c).unwrap_or_default();
    if let Err(e) = std::fs::write(dir.join(CAPTURE_FILE), text) {
        tracing::warn!("writing {}: {e}", dir.join(CAPTURE_FILE).display());
    }
}

/// `Checkpoint::capture` from the checkpoint's folder, if it has the record.
pub fn read_capture(d: &Daemon, cp: &mut Checkpoint) {
    let path = state_dir(d, cp.vm_id, cp.id).join(CAPTURE_FILE);
    if let Ok(text) = std::fs::read(path) {
        cp.capture = serde_json::from_slice(&text).ok();
    }
}

/// Finishes a live create whose outcome is unknown (module docs): `Ok(true)` committed,
/// `Ok(false)` rolled back. The caller holds the VM's lock.
pub async fn settle(d: &Arc<Daemon>, id: Uuid, intent: &Intent) -> Result<bool, String> {
    let Intent::Create {
        children,
        state_dir,
        live: Some(cp),
        ..
    } = intent
    else {
        super::recover::roll_back(d, id, intent);
        return Ok(false);
    };
    let mut on_children = None;
    if let Some(w) = d.sup.get(id) {
        on_children = worker_on_children(&w.socket(), state_dir, children).await;
        if on_children.is_none() {
            // Not answering: let its end be applied before the files are judged.
            let _ = w.exited_within(Duration::from_secs(10)).await;
        }
    }
    let commit_it = match on_children {
        Some(on) => on,
        None => {
            let (sdir, kids) = (state_dir.clone(), children.clone());
            tokio::task::spawn_blocking(move || durable_point_passed(&sdir, &kids))
                .await
                .unwrap_or(false)
        }
    };
    if !commit_it {
        super::recover::roll_back(d, id, intent);
        tracing::warn!(vm = %id, "interrupted live checkpoint rolled back");
        return Ok(false);
    }
    let head = d.store.checkpoint_head(id).map_err(|e| e.to_string())?;
    super::create::commit(d, id, cp, &cp.spec, &head, intent)?;
    tracing::warn!(vm = %id, checkpoint = %cp.id, "interrupted live checkpoint kept");
    Ok(true)
}

/// Asks a live worker, once its checkpoint is over, whether its disks use `children`:
/// `None` when it does not answer (dead or hung).
async fn worker_on_children(sock: &Path, state_dir: &Path, children: &[PathBuf]) -> Option<bool> {
    let files = disk_files_when_done(sock).await?;
    if children.is_empty() {
        // No disk to judge by: the worker leaves `vm.state` only when it succeeded.
        return Some(state_dir.join("vm.state").is_file());
    }
    // The worker switches all disks or none; one child in use is the VM's live top, which
    // must never be rolled back.
    Some(files.iter().any(|f| children.contains(f)))
}

/// The files a live worker's disks use once it no longer checkpoints (a capture or an
/// in-place apply): `None` when it does not answer (dead or hung).
pub(super) async fn disk_files_when_done(sock: &Path) -> Option<Vec<PathBuf>> {
    let until = tokio::time::Instant::now() + CAPTURE_LIMIT;
    let mut conn = WorkerConn::connect(sock).await.ok()?;
    loop {
        let st = conn.status().await.ok()?;
        if !st.checkpointing {
            break;
        }
        if tokio::time::Instant::now() > until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let WorkerReply::Metrics(m) = conn.call(WorkerOp::Metrics).await.ok()? else {
        return None;
    };
    Some(m.disks.into_iter().map(|d| d.path).collect())
}

/// With no worker left: `vm.state` complete and every child a valid VHDX.
fn durable_point_passed(state_dir: &Path, children: &[PathBuf]) -> bool {
    if !state_dir.join("vm.state").is_file() || !state_dir.join("memory.bin").is_file() {
        return false;
    }
    children
        .iter()
        .all(|c| vireo_vhdx::Vhdx::open(c, &vireo_vhdx::OpenOptions::read_only()).is_ok())
}
