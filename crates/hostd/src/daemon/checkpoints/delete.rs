//! `DELETE /v1/vms/{vm}/checkpoints/{cp}[?subtree=true]`: a job (`merge`). The record goes at
//! once (its children hang from its parent; "now" moves up if it ran from it); its disk data
//! then goes where Hyper-V puts it:
//!
//! - the frozen file's only user is the VM's running top (the common case: deleting the
//!   newest checkpoint, or any checkpoint on the VM's line with no other branch): the top is
//!   merged into the frozen file and the VM runs on that file afterwards — live, through the
//!   worker's control socket (`disk-merge`), when the VM has a worker (it never stops), else
//!   offline;
//! - nobody uses the frozen file any more (and vireod made it): the file is deleted;
//! - another checkpoint's file is a child of it (a branch after an apply, or a middle
//!   checkpoint): the file stays as an unnamed link of the chain. Merging there would rewrite
//!   another checkpoint's frozen data or its parent link; never done.
//!
//! `subtree` deletes the checkpoint and all below it, deepest first, each as above.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;
use vireo_api::{Checkpoint, JobKind, Vm, VmState};

use super::super::http_error::HttpError;
use super::super::Daemon;
use super::{disks, fault_point, is_ours};
use crate::checkpoint_store::{Head, Intent, PendingMerge, Top};

/// Longest wait for a line of the worker's merge progress.
const LINE_LIMIT: Duration = Duration::from_secs(120);

pub async fn delete(
    daemon: &Arc<Daemon>,
    vm: &Vm,
    key: &str,
    subtree: bool,
) -> Result<vireo_api::Job, HttpError> {
    let vm = daemon.store.get_by_id(vm.id())?;
    let cp = super::find(daemon, &vm, key)?;
    let order = if subtree {
        post_order(&daemon.store.list_checkpoints(vm.id())?, cp.id)
    } else {
        vec![cp.id]
    };
    delete_ids(daemon, &vm, order).await
}

/// Deletes the checkpoints `order` of `vm`, one after the other, in one job (`merge`); the
/// automatic checkpoints' retention uses it too.
pub async fn delete_ids(
    daemon: &Arc<Daemon>,
    vm: &Vm,
    order: Vec<Uuid>,
) -> Result<vireo_api::Job, HttpError> {
    let vm = daemon.store.get_by_id(vm.id())?;
    super::refuse_during_move(daemon, &vm)?;
    if matches!(
        vm.state,
        VmState::Starting | VmState::Stopping | VmState::Saving
    ) {
        return Err(HttpError::conflict(format!(
            "cannot delete a checkpoint of VM {:?} while it is {}; retry once it is done",
            vm.spec.name, vm.state
        )));
    }
    let job = daemon.store.create_job(Some(vm.id()), JobKind::Merge)?;
    let d = daemon.clone();
    let job_id = job.id;
    tokio::spawn(async move {
        let mut outcome = Ok(());
        for id in order {
            if let Err(m) = delete_one(&d, vm.id(), id, job_id).await {
                outcome = Err(m);
                break;
            }
        }
        if let Err(m) = &outcome {
            tracing::warn!(vm = %vm.id(), "checkpoint delete failed: {m}");
        }
        let _ = d.store.finish_job(job_id, outcome);
    });
    Ok(job)
}

/// `root` and everything below it, children before their parents.
fn post_order(all: &[Checkpoint], root: Uuid) -> Vec<Uuid> {
    let mut out = Vec::new();
    let mut stack = vec![(root, false)];
    while let Some((id, expanded)) = stack.pop() {
        if out.len() > all.len() {
            break;
        }
        if expanded {
            out.push(id);
            continue;
        }
        stack.push((id, true));
        for c in all.iter().filter(|c| c.parent == Some(id)) {
            stack.push((c.id, false));
        }
    }
    out
}

async fn delete_one(d: &Arc<Daemon>, vm_id: Uuid, id: Uuid, job: Uuid) -> Result<(), String> {
    let _g = d.lock_vm(vm_id).await;
    // A saved VM's disks change here; vireod's own locks on them step aside meanwhile.
    let _aside = crate::daemon::disk_locks::set_aside(d, vm_id);
    let err = |e: crate::StoreError| e.to_string();
    let vm = d.store.get_by_id(vm_id).map_err(err)?;
    let all = d.store.list_checkpoints(vm_id).map_err(err)?;
    let Some(cp) = all.iter().find(|c| c.id == id).cloned() else {
        return Ok(());
    };
    let head = d.store.checkpoint_head(vm_id).map_err(err)?;
    let others: Vec<&Checkpoint> = all.iter().filter(|c| c.id != id).collect();
    let mut merges = Vec::new();
    let mut remove = vec![super::state_dir(d, vm_id, id)];
    for x in &cp.disks {
        let f = &x.frozen;
        let child_cps = others
            .iter()
            .any(|c| c.disks.iter().any(|y| y.parent_file.as_ref() == Some(f)));
        let top = head.tops.get(&x.serial).filter(|t| {
            &t.parent == f
                && vm
                    .spec
                    .disks
                    .iter()
                    .any(|s| s.serial.as_deref() == Some(&x.serial) && s.path == t.file)
        });
        match (child_cps, top) {
            (false, Some(t)) => merges.push(PendingMerge {
                serial: x.serial.clone(),
                frozen: f.clone(),
                top: t.file.clone(),
                frozen_parent: x.parent_file.clone(),
            }),
            (false, None) if is_ours(d, vm_id, f) => remove.push(f.clone()),
            _ => tracing::info!(
                vm = %vm_id,
                "checkpoint {:?}: {} stays (other files build on it)",
                cp.name,
                f.display()
            ),
        }
    }
    let new_head = Head {
        current: if head.current == Some(id) {
            cp.parent
        } else {
            head.current
        },
        tops: head.tops.clone(),
    };
    let intent = Intent::Delete { merges, remove };
    if !d
        .store
        .commit_checkpoint_delete(vm_id, &[id], &new_head, &intent)
        .map_err(err)?
    {
        return Err(format!(
            "VM {:?} has another checkpoint operation in progress",
            vm.spec.name
        ));
    }
    fault_point("delete-commit");
    finish(d, vm_id, &intent, Some(job)).await?;
    tracing::info!(vm = %vm_id, checkpoint = %id, name = cp.name, "checkpoint deleted");
    Ok(())
}

/// The work a committed delete owes: its merges (each resumable), then its files.
pub async fn finish(
    d: &Arc<Daemon>,
    vm: Uuid,
    intent: &Intent,
    job: Option<Uuid>,
) -> Result<(), String> {
    let Intent::Delete { merges, remove } = intent else {
        return Ok(());
    };
    for m in merges {
        merge(d, vm, m, job).await?;
        let top = m.frozen_parent.clone().map(|p| Top {
            file: m.frozen.clone(),
            parent: p,
        });
        d.store
            .checkpoint_disk_moved(vm, &m.serial, &m.frozen, top)
            .map_err(|e| e.to_string())?;
        fault_point("delete-merged");
    }
    let used = super::recover::files_in_use(d, vm);
    for f in remove {
        if f.is_dir() || (is_ours(d, vm, f) && !used.contains(f)) {
            disks::remove(f);
        }
    }
    d.store
        .clear_checkpoint_intent(vm)
        .map_err(|e| e.to_string())
}

/// Merges `m.top` into `m.frozen`: done already, live through the worker, or offline.
async fn merge(
    d: &Arc<Daemon>,
    vm: Uuid,
    m: &PendingMerge,
    job: Option<Uuid>,
) -> Result<(), String> {
    if !m.top.exists() && m.frozen.exists() {
        return Ok(());
    }
    let live = d.store.get_by_id(vm).is_ok_and(|v| v.state.has_worker())
        && d.sup.get(vm).is_some_and(|w| w.is_alive());
    if live {
        let index = d
            .store
            .get_by_id(vm)
            .map_err(|e| e.to_string())?
            .spec
            .disks
            .iter()
            .position(|x| x.path == m.top)
            .ok_or_else(|| format!("the VM has no disk {} any more", m.top.display()))?;
        let sock = d.store.vm_dir(vm).join("control.sock");
        return live_merge(d, &sock, index, &m.top, job).await;
    }
    let top = m.top.clone();
    tokio::task::spawn_blocking(move || disks::merge_offline(&top))
        .await
        .map_err(|e| e.to_string())?
}

/// `disk-merge N` on the worker's control socket, progress into the job. A merge the worker
/// is already running (vireod restarted meanwhile) is waited for.
async fn live_merge(
    d: &Daemon,
    sock: &Path,
    index: usize,
    top: &Path,
    job: Option<Uuid>,
) -> Result<(), String> {
    let shown = sock.display();
    let conn = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| format!("connecting to {shown}: {e}"))?;
    let (r, mut w) = conn.into_split();
    w.write_all(format!("disk-merge {index}\n").as_bytes())
        .await
        .map_err(|e| format!("writing to {shown}: {e}"))?;
    let mut lines = BufReader::new(r).lines();
    loop {
        let line = tokio::time::timeout(LINE_LIMIT, lines.next_line())
            .await
            .map_err(|_| {
                format!(
                    "no merge progress from {shown} in {}s",
                    LINE_LIMIT.as_secs()
                )
            })?
            .map_err(|e| format!("reading {shown}: {e}"))?
            .ok_or_else(|| format!("{shown} closed during the merge"))?;
        if let Some(p) = line.strip_prefix("progress ") {
            let mut it = p.split(' ').filter_map(|n| n.parse::<u64>().ok());
            if let (Some(done), Some(total), Some(job)) = (it.next(), it.next(), job) {
                let pct = (done.saturating_mul(99) / total.max(1)).min(99) as u8;
                let _ = d.store.set_job_progress(job, pct);
            }
        } else if line.starts_with("ok") {
            return Ok(());
        } else if line.contains("already running") {
            return wait_gone(top).await;
        } else {
            return Err(format!("live merge: {}", line.trim_start_matches("error ")));
        }
    }
}

/// Waits (bounded) for a merge someone else runs to delete `top`.
async fn wait_gone(top: &Path) -> Result<(), String> {
    let top: PathBuf = top.to_path_buf();
    for _ in 0..36_000 {
        if !top.exists() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{} was not merged within an hour", top.display()))
}
