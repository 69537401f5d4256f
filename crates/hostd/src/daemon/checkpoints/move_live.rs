//! `vm move-storage` of a *running* (or paused) VM with checkpoints (docs/storage-migration.md,
//! "A VM with checkpoints"). The tree is planned as for a VM that is off (`move_tree::plan`);
//! then the work splits by who may touch which file:
//!
//! - vireod copies every frozen file (each checkpoint's, and the parents of the running
//!   chain): they never change while checkpoints exist, so a plain copy is consistent;
//! - the worker moves the files the VM writes (its running tops) with its live copy, each onto
//!   a new differencing file over the copied parent (`MoveStorage::targets`), and switches all
//!   disks in one step; it deletes no old file;
//! - vireod then records the move in one commit (spec, checkpoint records, head) and only
//!   after that deletes the old files.
//!
//! Crash safety: intent `Move` with `live` is recorded before the first copy and before the
//! job exists. At a restart with the intent still prepared, what the worker did decides
//! ([`settle`]): its disks on the new tops → the move is committed and the old files go; on
//! the old tops (or no move ever asked) → the copies go. Committed → the old files go
//! (`move_tree::finish`), as for a VM that is off.
//!
//! Locking: the job holds the VM's lock throughout; a checkpoint operation asked for meanwhile
//! is refused by `refuse_during_move` (the intent names the move).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;
use vireo_api::worker::{MoveState, MoveTarget, WorkerOp, WorkerReply};
use vireo_api::Vm;

use super::super::http_error::HttpError;
use super::super::move_storage::{follow_worker, WorkerEnd};
use super::super::worker_client::{call_once, WorkerCallError};
use super::super::Daemon;
use super::move_tree::{self, TreeMove};
use super::{disks, fault_point};
use crate::checkpoint_store::{Intent, LiveMove, MovedFile};

/// Bytes of frozen files copied by vireod count for the first half of the job's progress.
const FROZEN_SHARE: u8 = 50;

fn resolved(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn new_path(tree: &TreeMove, p: &Path) -> Option<PathBuf> {
    tree.renames
        .get(p)
        .or_else(|| tree.renames.get(&resolved(p)))
        .cloned()
}

/// Each running disk's target for the worker: the planned new path of its file and, for a
/// differencing VHDX, the planned copy of its parent.
pub fn targets(vm: &Vm, tree: &TreeMove) -> Result<Vec<MoveTarget>, HttpError> {
    let mut out = Vec::new();
    for disk in &vm.spec.disks {
        let to = new_path(tree, &disk.path).ok_or_else(|| {
            HttpError::internal(format!(
                "the move's plan has no place for disk {}",
                disk.path.display()
            ))
        })?;
        let parent = if disks::is_vhdx(&disk.path) {
            disks::parent_of_in_use(&disk.path).map_err(HttpError::conflict)?
        } else {
            None
        };
        let parent = match parent {
            Some(p) => Some(new_path(tree, &p).ok_or_else(|| {
                HttpError::internal(format!(
                    "the move's plan has no place for {}, the parent of {}",
                    p.display(),
                    disk.path.display()
                ))
            })?),
            None => None,
        };
        out.push(MoveTarget {
            from: disk.path.clone(),
            to,
            parent,
        });
    }
    Ok(out)
}

/// The intent a running VM's move records before its job starts.
pub fn intent(vm: &Vm, tree: &TreeMove) -> Intent {
    Intent::Move {
        files: tree.files.clone(),
        live: Some(LiveMove {
            tops: vm.spec.disks.iter().map(|d| resolved(&d.path)).collect(),
            renames: tree.renames.clone(),
        }),
    }
}

/// The job: frozen copies here, the running tops in the worker, then the commit. The intent
/// is recorded already. Err(`move_tree::CANCELLED`) when cancelled before the switch.
#[allow(clippy::too_many_arguments)]
pub async fn drive(
    d: &Arc<Daemon>,
    vm: &Vm,
    tree: TreeMove,
    to: PathBuf,
    targets: Vec<MoveTarget>,
    keep: Vec<PathBuf>,
    sock: PathBuf,
    job: Uuid,
    cancel: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let id = vm.id();
    let tops: Vec<PathBuf> = vm.spec.disks.iter().map(|d| resolved(&d.path)).collect();
    if let Err(e) = copy_frozen(d, &tree.files, &tops, job, cancel.clone()).await {
        move_tree::roll_back(d, id, &tree.files);
        return Err(e);
    }
    fault_point("move-copied");
    let op = WorkerOp::MoveStorage {
        to,
        flatten: false,
        keep: keep.clone(),
        targets,
    };
    let asked = match call_once(&sock, op).await {
        Ok(WorkerReply::Ok) => Ok(()),
        Ok(other) => Err(format!("the worker answered move storage with {other:?}")),
        Err(WorkerCallError::Refused(m)) => Err(format!(
            "VM {:?} cannot move its storage: {m}",
            vm.spec.name
        )),
        Err(e) => Err(format!("the worker did not answer move storage: {e}")),
    };
    if let Err(e) = asked {
        move_tree::roll_back(d, id, &tree.files);
        return Err(e);
    }
    match follow_worker(d, &sock, job, cancel, FROZEN_SHARE).await {
        WorkerEnd::Switched(_) => {}
        WorkerEnd::Cancelled => {
            move_tree::roll_back(d, id, &tree.files);
            return Err(move_tree::CANCELLED.into());
        }
        WorkerEnd::Failed(m, _) => {
            move_tree::roll_back(d, id, &tree.files);
            return Err(m);
        }
        // It may have switched before it went silent: while it lives the copies stay,
        // accounted for by the intent, until a restart asks it (`settle`). Gone (the VM
        // ended), its switch record decides, as `settle` would.
        WorkerEnd::Silent(m) => {
            if d.sup.get(id).is_none() {
                let live = LiveMove {
                    tops,
                    renames: tree.renames.clone(),
                };
                if settle_without_worker(d, id, &tree.files, &live)? {
                    return Ok(());
                }
            }
            return Err(m);
        }
    }
    fault_point("move-switched");
    commit(d, id, &tree.files, &tree.renames, &keep)
}

/// The worker runs on the new files: record it, then the old files go.
fn commit(
    d: &Daemon,
    id: Uuid,
    files: &[MovedFile],
    renames: &std::collections::BTreeMap<PathBuf, PathBuf>,
    keep: &[PathBuf],
) -> Result<(), String> {
    if let Err(e) = d.store.commit_checkpoint_move(id, renames) {
        // The intent stays prepared: the next start finds the worker on the new files and
        // records the move then.
        return Err(format!(
            "the VM runs on the moved files, but the move could not be recorded ({e}); \
             vireod records it at its next start"
        ));
    }
    super::super::switch_record::forget(d, id);
    fault_point("move-commit");
    move_tree::finish(d, id, files, keep);
    Ok(())
}

/// Copies the frozen files on a blocking thread, the job's progress from their bytes.
async fn copy_frozen(
    d: &Arc<Daemon>,
    files: &[MovedFile],
    tops: &[PathBuf],
    job: Uuid,
    cancel: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let total: u64 = files
        .iter()
        .filter(|f| !tops.contains(&f.from))
        .filter_map(|f| std::fs::metadata(&f.from).ok())
        .map(|m| m.len())
        .sum::<u64>()
        .max(1);
    let stop = Arc::new(AtomicBool::new(false));
    let copied = Arc::new(AtomicU64::new(0));
    let (files, tops) = (files.to_vec(), tops.to_vec());
    let (stop2, copied2) = (stop.clone(), copied.clone());
    let work = tokio::task::spawn_blocking(move || {
        let mut created = Vec::new();
        let r = move_tree::copy_tree(&files, &tops, &mut created, &stop2, &copied2);
        if r.is_err() {
            vireo_worker::move_storage::remove_created(&created);
        }
        r
    });
    tokio::pin!(work);
    let mut cancel_wait = Box::pin(super::super::jobs::cancelled(cancel));
    let mut asked = false;
    loop {
        tokio::select! {
            r = &mut work => {
                return r.unwrap_or_else(|e| Err(format!("the copy task failed: {e}")));
            }
            () = &mut cancel_wait, if !asked => {
                asked = true;
                stop.store(true, Ordering::SeqCst);
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                let done = copied.load(Ordering::Relaxed).min(total);
                let pct = (done * u64::from(FROZEN_SHARE) / total).max(1);
                let _ = d.store.set_job_progress(job, pct as u8);
            }
        }
    }
}

/// A running VM's move cut short by a vireod restart (intent still prepared): once the
/// worker's move has ended, its disks decide. Ok(true): the move was recorded.
pub async fn settle(
    d: &Arc<Daemon>,
    vm: Uuid,
    files: &[MovedFile],
    live: &LiveMove,
) -> Result<bool, String> {
    let Some(w) = d.sup.get(vm) else {
        return settle_without_worker(d, vm, files, live);
    };
    let sock = w.socket();
    // Bounded like `move_storage::after_adopt`: a large disk's copy may take long.
    for _ in 0..18_000 {
        match call_once(&sock, WorkerOp::MoveStorageStatus).await {
            Ok(WorkerReply::MoveStorage(p)) if p.state == MoveState::Running => {}
            Ok(_) => break,
            Err(e) => return Err(format!("asking the worker how its move stands: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let Ok(WorkerReply::Metrics(m)) = call_once(&sock, WorkerOp::Metrics).await else {
        return Err("the worker did not report its disks".into());
    };
    let new_tops = new_tops(files, live);
    let switched = m
        .disks
        .iter()
        .any(|disk| new_tops.iter().any(|t| resolved(t) == resolved(&disk.path)));
    if !switched {
        move_tree::roll_back(d, vm, files);
        return Ok(false);
    }
    let keep = super::super::move_storage::files_of_other_vms(d, vm);
    commit(d, vm, files, &live.renames, &keep)?;
    Ok(true)
}

/// The files the running tops were planned to move to.
fn new_tops(files: &[MovedFile], live: &LiveMove) -> Vec<PathBuf> {
    live.tops
        .iter()
        .filter_map(|t| files.iter().find(|f| &f.from == t).map(|f| f.to.clone()))
        .collect()
}

/// The worker is gone: its switch record (written before any guest write reached a copy)
/// decides. Switched → the new layout holds the guest's last writes and is committed; no
/// record → the VM never ran on the copies and they go. Ok(true): the move was recorded.
fn settle_without_worker(
    d: &Daemon,
    vm: Uuid,
    files: &[MovedFile],
    live: &LiveMove,
) -> Result<bool, String> {
    let new_tops = new_tops(files, live);
    let switched = super::super::switch_record::switched(d, vm).is_some_and(|r| {
        r.disks
            .iter()
            .any(|s| new_tops.iter().any(|t| resolved(t) == resolved(&s.to)))
    });
    if !switched {
        move_tree::roll_back(d, vm, files);
        super::super::switch_record::forget(d, vm);
        return Ok(false);
    }
    tracing::warn!(vm = %vm, "the worker switched to the moved files before it ended: committing");
    let keep = super::super::move_storage::files_of_other_vms(d, vm);
    commit(d, vm, files, &live.renames, &keep)?;
    Ok(true)
}
