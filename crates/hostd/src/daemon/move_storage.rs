//! Storage live migration through vireod (docs/storage-migration.md): `POST
//! /v1/vms/{vm}/move-storage` {to, flatten} → a `move_storage` job.
//!
//! - Running or paused VM: the worker copies, mirrors and switches (`MoveStorage`); this task
//!   polls its `MoveStorageStatus` into the job's progress and, once the worker switched, writes
//!   the new disk paths into the spec. A cancel of the job is passed on (`MoveStorageCancel`).
//! - Off VM: the same copy engine runs here on a blocking thread (no guest writes to follow).
//!
//! The VM's lock is held for the whole job, so hot add/remove, save, start and stop of that VM
//! answer 409 meanwhile. The spec follows the worker: should vireod die during a move, the
//! re-adoption (`after_adopt`) waits for the worker's move to end and takes the disk paths
//! from the worker's `Metrics` (the files it really has open).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use uuid::Uuid;
use vireo_api::storage_move::MoveStorageRequest;
use vireo_api::worker::{MoveDiskProgress, MoveProgress, MoveState, WorkerOp, WorkerReply};
use vireo_api::{ApiErrorCode, Job, JobKind, Vm, VmState};

use super::http_error::HttpError;
use super::jobs::cancelled;
use super::worker_client::{call_once, WorkerCallError};
use super::Daemon;

/// How often the worker's progress is read.
const POLL: Duration = Duration::from_millis(200);
/// Consecutive unanswered polls before the job gives up on the worker (the VM ended).
const MAX_SILENT_POLLS: u32 = 50;

fn invalid(message: String) -> HttpError {
    HttpError::new(ApiErrorCode::Invalid, message)
}

/// The destination folder: absolute, inside a storage root (symlinks resolved), created if
/// missing (its parent must then be inside a root).
fn destination(d: &Daemon, to: &Path) -> Result<PathBuf, HttpError> {
    if !to.is_absolute() {
        return Err(invalid(format!(
            "destination {} is not absolute",
            to.display()
        )));
    }
    if !to.exists() {
        let parent = to
            .parent()
            .ok_or_else(|| invalid(format!("destination {} has no parent folder", to.display())))?;
        d.storage.confine_path("destination", parent)?;
        std::fs::create_dir(to)
            .map_err(|e| invalid(format!("creating destination {}: {e}", to.display())))?;
    }
    let real = d.storage.confine_path("destination", to)?;
    if !real.is_dir() {
        return Err(invalid(format!(
            "destination {} is not a folder",
            to.display()
        )));
    }
    Ok(real)
}

/// Every file the disks of the *other* VMs use (their VHDX chains included), and every file
/// their checkpoints name (with its chain: a checkpoint may keep a base disk the VM's disks no
/// longer reach): never deleted by a move or a migration, even when unlocked (the other VM may
/// be off).
pub fn files_of_other_vms(d: &Daemon, me: Uuid) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for vm in d.store.list().unwrap_or_default() {
        if vm.id() == me {
            continue;
        }
        let mut named: Vec<PathBuf> = vm.spec.disks.iter().map(|k| k.path.clone()).collect();
        named.extend(super::checkpoints::recover::files_in_use(d, vm.id()));
        named.sort();
        named.dedup();
        for path in named {
            out.extend(super::unused_files::with_chain(&path));
        }
    }
    out
}

/// A VM with checkpoints moves its whole tree (`checkpoints::move_tree`, `move_live`), never
/// flattened, and not while a checkpoint operation of it is under way.
fn refuse_checkpointed(daemon: &Daemon, vm: &Vm, flatten: bool) -> Result<(), HttpError> {
    let name = &vm.spec.name;
    if flatten {
        return Err(HttpError::conflict(format!(
            "VM {name:?} has checkpoints: --flatten would merge the files they froze into one \
             and lose them; move without --flatten (the checkpoints move with the disks), or \
             delete the checkpoints first (`vireo checkpoint rm {name} CHECKPOINT`)"
        )));
    }
    if super::checkpoints::intent_of(daemon, vm.id()).is_some() {
        return Err(HttpError::conflict(format!(
            "VM {name:?} has a checkpoint operation under way (create, apply or delete); move \
             its storage once that job has finished (`vireo job list`)"
        )));
    }
    Ok(())
}

/// `POST /v1/vms/{vm}/move-storage`.
pub async fn start(
    daemon: &Arc<Daemon>,
    vm: &Vm,
    req: MoveStorageRequest,
) -> Result<Job, HttpError> {
    let guard = daemon.try_lock_vm(vm)?;
    let vm = daemon.store.get_by_id(vm.id())?;
    let name = vm.spec.name.clone();
    let live = match vm.state {
        VmState::Running | VmState::Paused => true,
        VmState::Off => false,
        ref s => {
            return Err(HttpError::conflict(format!(
                "cannot move the storage of VM {name:?} while it is {s}; wait until it is \
                 running or off"
            )))
        }
    };
    if vm.spec.disks.is_empty() {
        return Err(HttpError::conflict(format!("VM {name:?} has no disks")));
    }
    let checkpointed = !daemon.store.list_checkpoints(vm.id())?.is_empty();
    if checkpointed {
        // Before the destination folder is made: a refused move leaves nothing behind.
        refuse_checkpointed(daemon, &vm, req.flatten)?;
    }
    let to = destination(daemon, &req.to)?;
    let tree = if checkpointed {
        Some(super::checkpoints::move_tree::plan(daemon, &vm, &to)?)
    } else {
        None
    };
    // A tree's plan checked its own destinations.
    for disk in vm.spec.disks.iter().filter(|_| tree.is_none()) {
        if let Some(file) = disk.path.file_name() {
            if to.join(file).exists() {
                return Err(HttpError::conflict(format!(
                    "{} exists already; choose another destination or remove it",
                    to.join(file).display()
                )));
            }
        }
    }
    let keep = {
        let d = daemon.clone();
        let id = vm.id();
        tokio::task::spawn_blocking(move || files_of_other_vms(&d, id))
            .await
            .unwrap_or_default()
    };
    let how = if !live {
        match tree {
            Some(tree) => How::Tree(tree),
            None => How::Offline,
        }
    } else {
        let w = daemon.sup.get(vm.id()).ok_or_else(|| {
            HttpError::conflict(format!(
                "VM {name:?} has no worker now (it is ending); retry"
            ))
        })?;
        match tree {
            Some(tree) => {
                use super::checkpoints::move_live;
                let targets = move_live::targets(&vm, &tree)?;
                // Recorded before the job exists: a checkpoint operation asked for from here
                // on is refused, and one in flight refuses the move.
                super::checkpoints::begin_intent(daemon, &vm, &move_live::intent(&vm, &tree))
                    .map_err(HttpError::conflict)?;
                super::checkpoints::fault_point("move-intent");
                How::LiveTree(w, tree, targets)
            }
            None => {
                ask_worker(&w.socket(), &name, &to, req.flatten, &keep).await?;
                How::Live(w)
            }
        }
    };
    let job = daemon
        .store
        .create_job(Some(vm.id()), JobKind::MoveStorage)?;
    let cancel = daemon.jobs.register(job.id);
    let d = daemon.clone();
    let job_id = job.id;
    tokio::spawn(async move {
        let _guard = guard;
        use super::checkpoints::{move_live, move_tree};
        let tree_end = |r: Result<(), String>| match r {
            Ok(()) => End::Done,
            Err(e) if e == move_tree::CANCELLED => End::Cancelled,
            Err(e) => End::Failed(e),
        };
        let end = match how {
            How::Live(w) => follow_plain(&d, &w.socket(), job_id, cancel).await,
            How::LiveTree(w, tree, targets) => {
                let sock = w.socket();
                tree_end(
                    move_live::drive(&d, &vm, tree, to, targets, keep, sock, job_id, cancel).await,
                )
            }
            How::Tree(tree) => {
                tree_end(move_tree::drive(&d, &vm, tree, keep, job_id, cancel).await)
            }
            How::Offline => move_offline(&d, &vm, &to, req.flatten, keep, job_id, cancel).await,
        };
        match end {
            End::Done => {
                let _ = d.store.finish_job(job_id, Ok(()));
            }
            End::Cancelled => {
                let _ = d.store.cancel_job(job_id);
            }
            End::Failed(m) => {
                tracing::warn!(vm = %vm.id(), "move storage failed: {m}");
                let _ = d.store.finish_job(job_id, Err(m));
            }
        }
        d.jobs.finished(job_id);
    });
    Ok(job)
}

/// Who moves what: the worker alone (a running VM), vireod and the worker (a running VM with
/// checkpoints), vireod alone (a VM that is off, with or without checkpoints).
enum How {
    Live(Arc<super::supervisor::Worker>),
    LiveTree(
        Arc<super::supervisor::Worker>,
        super::checkpoints::move_tree::TreeMove,
        Vec<vireo_api::worker::MoveTarget>,
    ),
    Tree(super::checkpoints::move_tree::TreeMove),
    Offline,
}

/// Starts the worker's move of a VM without checkpoints (refused: 409, nothing started).
async fn ask_worker(
    sock: &Path,
    name: &str,
    to: &Path,
    flatten: bool,
    keep: &[PathBuf],
) -> Result<(), HttpError> {
    let op = WorkerOp::MoveStorage {
        to: to.to_path_buf(),
        flatten,
        keep: keep.to_vec(),
        targets: Vec::new(),
    };
    match call_once(sock, op).await {
        Ok(WorkerReply::Ok) => Ok(()),
        Ok(other) => Err(HttpError::internal(format!(
            "the worker of VM {name:?} answered move storage with {other:?}"
        ))),
        Err(WorkerCallError::Refused(m)) => Err(HttpError::conflict(format!(
            "VM {name:?} cannot move its storage: {m}"
        ))),
        Err(e) => Err(HttpError::internal(format!(
            "the worker of VM {name:?} did not answer move storage: {e}"
        ))),
    }
}

enum End {
    Done,
    Cancelled,
    Failed(String),
}

fn percent(p: &MoveProgress) -> u8 {
    let (copied, total) = p.disks.iter().fold((0u64, 0u64), |(c, t), d| {
        (c + d.bytes_copied, t + d.bytes_total)
    });
    if total == 0 {
        return 1;
    }
    // 99 at most: 100 is the switch.
    ((copied.min(total) * 99) / total).max(1) as u8
}

/// How the worker's move ended, as [`follow_worker`] saw it.
pub enum WorkerEnd {
    /// Every disk is on its copy.
    Switched(MoveProgress),
    Cancelled,
    /// Failed before the switch: every disk is on its old file.
    Failed(String, MoveProgress),
    /// The worker stopped answering (the VM ended): whether it switched is unknown.
    Silent(String),
}

/// Polls the worker until its move ended. The job's progress runs from `base` to 99.
pub async fn follow_worker(
    d: &Daemon,
    sock: &Path,
    job: Uuid,
    cancel: tokio::sync::watch::Receiver<bool>,
    base: u8,
) -> WorkerEnd {
    let mut asked_cancel = false;
    let mut silent = 0;
    let mut cancel_wait = Box::pin(cancelled(cancel));
    loop {
        tokio::select! {
            () = &mut cancel_wait, if !asked_cancel => {
                asked_cancel = true;
                if let Err(e) = call_once(sock, WorkerOp::MoveStorageCancel).await {
                    tracing::warn!("passing the cancel on to the worker: {e}");
                }
                continue;
            }
            () = tokio::time::sleep(POLL) => {}
        }
        let p = match call_once(sock, WorkerOp::MoveStorageStatus).await {
            Ok(WorkerReply::MoveStorage(p)) => p,
            other => {
                silent += 1;
                if silent >= MAX_SILENT_POLLS {
                    return WorkerEnd::Silent(format!(
                        "the worker stopped answering during the move ({other:?}); the disk \
                         paths are taken from the files that exist"
                    ));
                }
                continue;
            }
        };
        silent = 0;
        match p.state {
            MoveState::Running | MoveState::Idle => {
                let share = u32::from(percent(&p)) * u32::from(99 - base.min(99)) / 99;
                let _ = d
                    .store
                    .set_job_progress(job, (u32::from(base) + share).max(1) as u8);
            }
            MoveState::Completed => return WorkerEnd::Switched(p),
            MoveState::Cancelled => return WorkerEnd::Cancelled,
            MoveState::Failed => {
                let m = p
                    .message
                    .clone()
                    .unwrap_or_else(|| "the move failed".into());
                return WorkerEnd::Failed(m, p);
            }
        }
    }
}

/// A VM without checkpoints: the spec follows what the worker switched.
async fn follow_plain(
    d: &Daemon,
    sock: &Path,
    job: Uuid,
    cancel: tokio::sync::watch::Receiver<bool>,
) -> End {
    match follow_worker(d, sock, job, cancel, 0).await {
        WorkerEnd::Switched(p) => match switched_then_apply(d, job, &p.disks) {
            Ok(()) => {
                if let Some(vm) = d.store.get_job(job).ok().and_then(|j| j.vm_id) {
                    super::switch_record::forget(d, vm);
                }
                if let Some(note) = p.message {
                    tracing::info!("move storage: {note}");
                }
                End::Done
            }
            Err(e) => End::Failed(e),
        },
        WorkerEnd::Cancelled => End::Cancelled,
        WorkerEnd::Failed(m, p) => {
            let _ = apply(d, job, &p.disks);
            End::Failed(m)
        }
        WorkerEnd::Silent(m) => after_silence(d, job, m),
    }
}

/// The worker went silent during the move. Gone, it may have switched first: its record
/// says so, and then the copies (holding the guest's last writes) become the VM's disks.
fn after_silence(d: &Daemon, job: Uuid, m: String) -> End {
    let Some(vm) = d.store.get_job(job).ok().and_then(|j| j.vm_id) else {
        return End::Failed(m);
    };
    if d.sup.get(vm).is_some() {
        return End::Failed(m);
    }
    match super::switch_record::switched(d, vm) {
        Some(rec) => match super::switch_record::apply_plain(d, vm, &rec) {
            Ok(()) => End::Done,
            Err(e) => End::Failed(format!("{m}; {e}")),
        },
        None => End::Failed(m),
    }
}

/// The worker switched, the spec does not say so yet: the fault point of a move cut short
/// there (vireod dies; its restart finds the worker, or its switch record, on the copies).
fn switched_then_apply(d: &Daemon, job: Uuid, disks: &[MoveDiskProgress]) -> Result<(), String> {
    super::checkpoints::fault_point("move-switched");
    apply(d, job, disks)
}

/// Writes the disks' current files into the spec of the job's VM (by serial, else by index).
fn apply(d: &Daemon, job: Uuid, disks: &[MoveDiskProgress]) -> Result<(), String> {
    let vm_id = d
        .store
        .get_job(job)
        .ok()
        .and_then(|j| j.vm_id)
        .ok_or("the job's VM is gone")?;
    let vm = d.store.get_by_id(vm_id).map_err(|e| e.to_string())?;
    let mut spec = vm.spec.clone();
    let mut changed = false;
    for (i, m) in disks.iter().enumerate() {
        let slot = spec
            .disks
            .iter()
            .position(|s| s.serial.is_some() && s.serial == m.serial)
            .unwrap_or(i);
        if let Some(disk) = spec.disks.get_mut(slot) {
            if disk.path != m.current {
                disk.path = m.current.clone();
                changed = true;
            }
        }
    }
    if changed {
        d.store
            .update_spec(vm_id, &spec)
            .map_err(|e| format!("the disks moved, but the spec could not be updated: {e}"))?;
    }
    Ok(())
}

/// An off VM: the worker's copy engine, here, with nothing writing to the disks.
async fn move_offline(
    d: &Arc<Daemon>,
    vm: &Vm,
    to: &Path,
    flatten: bool,
    keep: Vec<PathBuf>,
    job: Uuid,
    cancel: tokio::sync::watch::Receiver<bool>,
) -> End {
    use vireo_worker::move_storage::{Disk, Job as MoveJob, MovableBackend};
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Mutex::new(MoveProgress::default()));
    let disks = vm.spec.disks.clone();
    let (to, stop2, progress2) = (to.to_path_buf(), stop.clone(), progress.clone());
    let work = tokio::task::spawn_blocking(move || -> Result<Vec<MoveDiskProgress>, String> {
        let mut moving = Vec::new();
        for (index, disk) in disks.iter().enumerate() {
            let arg = vireo_worker::image::DiskArg {
                path: disk.path.clone(),
                read_only: false,
                format: disk.format.map(|f| match f {
                    vireo_api::DiskFormat::Raw => vireo_vhdx::convert::Format::Raw,
                    vireo_api::DiskFormat::Vhd => vireo_vhdx::convert::Format::Vhd,
                    vireo_api::DiskFormat::Vhdx => vireo_vhdx::convert::Format::Vhdx,
                }),
                queues: None,
            };
            let opened = vireo_worker::image::open(&arg).map_err(|e| e.to_string())?;
            moving.push(Disk {
                index,
                serial: disk.serial.clone(),
                from: disk.path.clone(),
                movable: Arc::new(MovableBackend::new(
                    opened.backend,
                    disk.path.clone(),
                    opened.image,
                )),
            });
        }
        *progress2.lock() = MoveProgress {
            state: MoveState::Running,
            disks: moving
                .iter()
                .map(|m| MoveDiskProgress {
                    serial: m.serial.clone(),
                    from: m.from.clone(),
                    to: to.join(m.from.file_name().unwrap_or_default()),
                    current: m.from.clone(),
                    bytes_total: 0,
                    bytes_copied: 0,
                    pass: 0,
                    switched: false,
                })
                .collect(),
            message: None,
        };
        let job = MoveJob {
            to: &to,
            flatten,
            keep: &keep,
            targets: &[],
            progress: &progress2,
            cancel: &stop2,
            record_in: None,
        };
        job.run(&moving, &|_, _, _| {})?;
        Ok(progress2.lock().disks.clone())
    });
    tokio::pin!(work);
    let mut cancel_wait = Box::pin(cancelled(cancel));
    let mut asked = false;
    let outcome = loop {
        tokio::select! {
            r = &mut work => break r,
            () = &mut cancel_wait, if !asked => {
                asked = true;
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            () = tokio::time::sleep(POLL) => {
                let p = progress.lock().clone();
                let _ = d.store.set_job_progress(job, percent(&p));
            }
        }
    };
    match outcome {
        Ok(Ok(disks)) => match apply(d, job, &disks) {
            Ok(()) => End::Done,
            Err(e) => End::Failed(e),
        },
        Ok(Err(e)) if e == "cancelled" => End::Cancelled,
        Ok(Err(e)) => End::Failed(e),
        Err(e) => End::Failed(format!("the copy task failed: {e}")),
    }
}

/// `POST /v1/jobs/{id}/cancel` of a move: passed on to the job's task, which ends the job as
/// cancelled once the copies are gone (or completed, when the switch came first).
pub fn cancel(daemon: &Daemon, job: &Job) -> Job {
    daemon.jobs.cancel(job.id);
    job.clone()
}

/// A re-adopted worker (vireod restarted) may still be moving, or may have switched while
/// nobody listened: once its move has ended, the spec takes the files the worker has open.
pub fn after_adopt(daemon: &Arc<Daemon>, sock: PathBuf, vm_id: Uuid) {
    let d = daemon.clone();
    tokio::spawn(async move {
        // Bounded: a move of a large disk may take long, but not forever (1 h).
        for _ in 0..18_000 {
            match call_once(&sock, WorkerOp::MoveStorageStatus).await {
                Ok(WorkerReply::MoveStorage(p)) if p.state == MoveState::Running => {}
                Ok(WorkerReply::MoveStorage(p)) if p.state == MoveState::Idle => return,
                Ok(WorkerReply::MoveStorage(_)) => break,
                _ => return,
            }
            tokio::time::sleep(POLL).await;
        }
        let Ok(WorkerReply::Metrics(m)) = call_once(&sock, WorkerOp::Metrics).await else {
            return;
        };
        let _guard = d.lock_vm(vm_id).await;
        let Ok(vm) = d.store.get_by_id(vm_id) else {
            return;
        };
        let mut spec = vm.spec.clone();
        let mut changed = false;
        for (disk, seen) in spec.disks.iter_mut().zip(&m.disks) {
            if disk.serial == seen.serial && disk.path != seen.path {
                tracing::info!(
                    vm = %vm_id,
                    "disk {} moved to {} while vireod was away",
                    disk.path.display(),
                    seen.path.display()
                );
                disk.path = seen.path.clone();
                changed = true;
            }
        }
        if changed {
            if let Err(e) = d.store.update_spec(vm_id, &spec) {
                tracing::error!(vm = %vm_id, "updating moved disk paths: {e}");
                return;
            }
        }
        super::switch_record::forget(&d, vm_id);
    });
}

/// The route: 202 with the job.
pub async fn route(
    axum::extract::State(d): axum::extract::State<Arc<Daemon>>,
    super::http_error::ApiPath(key): super::http_error::ApiPath<String>,
    super::http_error::ApiJson(req): super::http_error::ApiJson<MoveStorageRequest>,
) -> Result<(axum::http::StatusCode, axum::Json<Job>), HttpError> {
    let vm = d.find(&key)?;
    let job = start(&d, &vm, req).await?;
    Ok((axum::http::StatusCode::ACCEPTED, axum::Json(job)))
}
