//! Export, import and clone (docs/export.md): jobs that copy a VM's files into a folder with a
//! manifest, register such a folder as a VM, or both at once.
//!
//! - `package`: an export folder written from a `Source` (spec + frozen disk chains + saved
//!   state), built under a partial name and renamed last.
//! - `import`: checks (every problem reported at once), then copy and store.
//! - `files`: chains, copies with progress and cancel, locator rewriting.
//! - `tree_manifest`: the checkpoint tree in the manifest (version 2) and its checks.
//!
//! Locking: export and clone hold the source VM's lock (`Daemon::try_lock_vm`) for the whole
//! job, so it cannot start (and change its disks) meanwhile; a request on it answers 409 busy.
//! Cancel: the job's switch in `Daemon::jobs`, turned into an `AtomicBool` the copy loop reads
//! between chunks; a cancelled or failed job removes what it wrote before it ends.

pub mod files;
pub mod import;
pub mod import_tree;
pub mod manifest;
pub mod package;
pub mod tree_manifest;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use uuid::Uuid;
use vireo_api::{
    validate_name, CloneRequest, ExportRequest, ImportReply, ImportRequest, Job, JobKind,
};

use self::files::CopyError;
use self::package::{Progress, Source};
use super::http_error::{ApiJson, ApiPath, HttpError};
use super::routes::St;
use super::Daemon;

/// `POST /v1/jobs/{id}/cancel` of an export, import or clone: the job ends `cancelled` at once;
/// its task removes what it wrote.
pub fn cancel(daemon: &Daemon, id: Uuid) -> Result<Job, HttpError> {
    let job = daemon.store.cancel_job(id)?;
    daemon.jobs.cancel(id);
    Ok(job)
}

/// The job's cancel switch as a flag the blocking copy reads.
fn cancel_flag(daemon: &Daemon, job: Uuid) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let rx = daemon.jobs.register(job);
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let watcher = tokio::spawn(async move {
        super::jobs::cancelled(rx).await;
        f.store(true, Ordering::SeqCst);
    });
    (flag, watcher)
}

fn outcome(r: Result<(), CopyError>) -> Result<(), String> {
    match r {
        Ok(()) => Ok(()),
        Err(CopyError::Cancelled) => Err("cancelled".into()),
        Err(CopyError::Failed(m)) => Err(m),
    }
}

/// Ends the job unless a cancel ended it first.
fn finish(daemon: &Daemon, job: Uuid, r: Result<(), String>) {
    if let Err(m) = &r {
        tracing::warn!(%job, "{m}");
    }
    let _ = daemon.store.finish_job(job, r);
    daemon.jobs.finished(job);
}

/// An existing directory inside the storage roots, for `field`.
fn checked_dir(daemon: &Daemon, field: &str, dir: &std::path::Path) -> Result<PathBuf, HttpError> {
    if !dir.is_absolute() || !dir.is_dir() {
        return Err(HttpError::new(
            vireo_api::ApiErrorCode::Invalid,
            format!(
                "{field} {}: not an existing directory (an absolute path)",
                dir.display()
            ),
        ));
    }
    daemon.storage.confine_path(field, dir)
}

/// `POST /v1/vms/{vm}/export` → 202 and the job.
pub async fn export(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiJson(req): ApiJson<ExportRequest>,
) -> Result<(StatusCode, Json<Job>), HttpError> {
    let vm = d.find(&key)?;
    let dir = checked_dir(&d, "dir", &req.dir)?;
    let dest = dir.join(&vm.spec.name);
    if dest.exists() {
        return Err(HttpError::conflict(format!(
            "{} already exists; export to another folder or remove it",
            dest.display()
        )));
    }
    // A saved VM's disks are read here; vireod's own locks on them step aside meanwhile.
    let guard = (
        d.try_lock_vm(&vm)?,
        crate::daemon::disk_locks::set_aside(&d, vm.id()),
    );
    let source = match &req.checkpoint {
        // A checkpoint's files do not change: exported as they are, whatever the VM does.
        Some(key) => {
            let cp = crate::daemon::checkpoints::find(&d, &vm, key)?;
            Some(Source::of_checkpoint(&d, &vm, &cp).map_err(HttpError::conflict)?)
        }
        // Running or paused: from a checkpoint taken for it, live (`live_source`).
        None if live(&vm) => {
            crate::daemon::checkpoints::disks::checkpointed(&vm.spec)
                .map_err(|m| HttpError::new(vireo_api::ApiErrorCode::Invalid, m))?;
            None
        }
        None => Some(Source::of_vm(&d, vm.id())?),
    };
    let job = d.store.create_job(Some(vm.id()), JobKind::Export)?;
    spawn_export(d.clone(), guard, vm.id(), source, dest, job.id);
    Ok((StatusCode::ACCEPTED, Json(job)))
}

/// A VM exported and cloned through a temporary live checkpoint.
fn live(vm: &vireo_api::Vm) -> bool {
    matches!(
        vm.state,
        vireo_api::VmState::Running | vireo_api::VmState::Paused
    )
}

/// The temporary checkpoint's name: `<vm>-export-<job>` (within 64 characters).
fn temp_name(vm: &vireo_api::Vm, what: &str, job: Uuid) -> String {
    let vm_part: String = vm.spec.name.chars().take(40).collect();
    format!("{vm_part}-{what}-{}", &job.simple().to_string()[..8])
}

/// A running VM's point-in-time source: a live checkpoint (one short pause; the caller holds
/// the VM's lock). `drop_checkpoint` removes it afterwards.
async fn live_source(
    d: &Arc<Daemon>,
    id: Uuid,
    what: &str,
    job: Uuid,
) -> Result<(Source, vireo_api::Checkpoint), String> {
    let vm = d.store.get_by_id(id).map_err(|e| e.to_string())?;
    let name = temp_name(&vm, what, job);
    let cp = crate::daemon::checkpoints::live::capture(d, id, &name, job, false).await?;
    let vm = d.store.get_by_id(id).map_err(|e| e.to_string())?;
    // An export carries the rest of the tree; a clone never does (docs/export.md).
    let source = if what == "export" {
        Source::of_live_checkpoint(d, &vm, &cp)
    } else {
        Source::of_checkpoint(d, &vm, &cp)
    };
    match source {
        Ok(s) => Ok((s, cp)),
        Err(m) => {
            // After the caller lets go of the VM's lock (the delete takes it).
            let (d, cp) = (d.clone(), cp.clone());
            tokio::spawn(async move { drop_checkpoint(&d, id, &cp).await });
            Err(m)
        }
    }
}

/// Deletes the temporary checkpoint (its child merges back live; the VM's lock must be free).
async fn drop_checkpoint(d: &Arc<Daemon>, id: Uuid, cp: &vireo_api::Checkpoint) {
    let deleted = async {
        let vm = d.store.get_by_id(id).map_err(|e| e.to_string())?;
        let job = crate::daemon::checkpoints::delete::delete(d, &vm, &cp.id.to_string(), false)
            .await
            .map_err(|e| e.body.message)?;
        crate::daemon::checkpoints::create::wait_job(d, job.id).await
    };
    if let Err(m) = deleted.await {
        tracing::warn!(vm = %id, checkpoint = %cp.name, "removing the temporary checkpoint: {m}");
    }
}

fn spawn_export(
    d: Arc<Daemon>,
    guard: impl Send + 'static,
    id: Uuid,
    source: Option<Source>,
    dest: PathBuf,
    job: Uuid,
) {
    let (flag, watcher) = cancel_flag(&d, job);
    tokio::spawn(async move {
        let dd = d.clone();
        let (source, temp) = match source {
            Some(s) => (s, None),
            None => match live_source(&d, id, "export", job).await {
                Ok((s, cp)) => (s, Some(cp)),
                Err(m) => {
                    watcher.abort();
                    drop(guard);
                    finish(&d, job, Err(m));
                    return;
                }
            },
        };
        let r = tokio::task::spawn_blocking(move || {
            let parent = dest.parent().unwrap_or(std::path::Path::new("/"));
            let tag = job.simple().to_string();
            let partial = files::partial_name(parent, &source.spec.name, "export", &tag[..8]);
            let mut progress = Progress::new(dd, job, source.bytes(true));
            package::write(&source, &dest, &partial, true, &flag, &mut progress).map(|_| ())
        })
        .await
        .unwrap_or_else(|e| Err(CopyError::Failed(format!("export task: {e}"))));
        watcher.abort();
        drop(guard);
        if let Some(cp) = temp {
            drop_checkpoint(&d, id, &cp).await;
        }
        finish(&d, job, outcome(r));
    });
}

/// `POST /v1/vms/import` → 202 with the job, the VM's name-to-be and warnings; 422 listing
/// every problem when the VM cannot be imported as asked.
pub async fn import(
    State(d): St,
    ApiJson(req): ApiJson<ImportRequest>,
) -> Result<(StatusCode, Json<ImportReply>), HttpError> {
    let plan = import::plan(&d, &req)?;
    let job = d.store.create_job(None, JobKind::Import)?;
    let reply = ImportReply {
        job: job.clone(),
        name: plan.spec.name.clone(),
        dir: plan.dest.clone(),
        warnings: plan.warnings.clone(),
    };
    let (flag, watcher) = cancel_flag(&d, job.id);
    let dd = d.clone();
    tokio::spawn(async move {
        let job = job.id;
        let d2 = dd.clone();
        let plan = Arc::new(plan);
        let p2 = plan.clone();
        let f2 = flag.clone();
        let copied = tokio::task::spawn_blocking(move || {
            let mut progress = Progress::new(d2, job, import::bytes(&p2));
            import::copy_files(&p2, job, &f2, &mut progress)
        })
        .await
        .unwrap_or_else(|e| Err(CopyError::Failed(format!("import task: {e}"))));
        let r = match outcome(copied) {
            Err(e) => Err(e),
            Ok(()) if flag.load(Ordering::SeqCst) => {
                remove_copy(&plan);
                Err("cancelled".into())
            }
            Ok(()) => match import::register(&dd, &plan).await {
                Ok(_) => Ok(()),
                Err(e) => {
                    remove_copy(&plan);
                    Err(e)
                }
            },
        };
        watcher.abort();
        finish(&dd, job, r);
    });
    Ok((StatusCode::ACCEPTED, Json(reply)))
}

/// A copy the import made and could not register goes again (never the export folder itself).
fn remove_copy(plan: &import::Plan) {
    if plan.copy && plan.dest != plan.from {
        files::remove_partial(&plan.dest);
    }
}

/// `POST /v1/vms/{vm}/clone` → 202: a copy of a VM's files into `<to>/<name>/` (an export
/// folder), registered in place with a new identity. A saved state is not cloned; a running
/// or paused VM's disks are copied from a temporary live checkpoint, deleted afterwards.
pub async fn clone(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiJson(req): ApiJson<CloneRequest>,
) -> Result<(StatusCode, Json<ImportReply>), HttpError> {
    let vm = d.find(&key)?;
    let what = format!("clone {:?} as {:?}", vm.spec.name, req.name);
    let mut problems = Vec::new();
    if let Err(e) = validate_name("name", &req.name) {
        problems.push(e.to_string());
    } else if d.store.get_by_name(&req.name).is_ok() {
        problems.push(format!(
            "a VM named {:?} already exists; choose another name",
            req.name
        ));
    }
    let to = match &req.to {
        Some(to) => checked_dir(&d, "to", to)?,
        None => import::default_dir(&d).map_err(HttpError::bad_request)?,
    };
    let dest = to.join(&req.name);
    if dest.exists() {
        problems.push(format!("{} already exists; fix: --to DIR", dest.display()));
    }
    if !problems.is_empty() {
        return Err(import::report(&what, &problems));
    }
    let guard = (
        d.try_lock_vm(&vm)?,
        crate::daemon::disk_locks::set_aside(&d, vm.id()),
    );
    let source = if live(&vm) {
        crate::daemon::checkpoints::disks::checkpointed(&vm.spec)
            .map_err(|m| HttpError::new(vireo_api::ApiErrorCode::Invalid, m))?;
        None
    } else {
        // A clone starts without checkpoints, as in Hyper-V (docs/export.md).
        Some(Source {
            tree: None,
            ..Source::of_vm(&d, vm.id())?
        })
    };
    let mut warnings = Vec::new();
    if live(&vm) {
        warnings.push(format!(
            "the clone starts off: {:?} runs, its disks are cloned as of a checkpoint taken \
             now (its memory is not: a new identity has new MACs)",
            vm.spec.name
        ));
    } else if source.as_ref().is_some_and(|s| s.saved.is_some()) {
        warnings.push(format!(
            "the clone starts off: {:?}'s saved state is not cloned (a new identity has new MACs, \
             which a saved state cannot take)",
            vm.spec.name
        ));
    }
    let job = d.store.create_job(Some(vm.id()), JobKind::Clone)?;
    let reply = ImportReply {
        job: job.clone(),
        name: req.name.clone(),
        dir: dest.clone(),
        warnings,
    };
    let (flag, watcher) = cancel_flag(&d, job.id);
    let dd = d.clone();
    let name = req.name.clone();
    let id = vm.id();
    tokio::spawn(async move {
        let job = job.id;
        let (source, temp) = match source {
            Some(s) => (s, None),
            None => match live_source(&dd, id, "clone", job).await {
                // Only the disks: a clone starts off.
                Ok((s, cp)) => (Source { saved: None, ..s }, Some(cp)),
                Err(m) => {
                    watcher.abort();
                    drop(guard);
                    finish(&dd, job, Err(m));
                    return;
                }
            },
        };
        let d2 = dd.clone();
        let dest2 = dest.clone();
        let f2 = flag.clone();
        let written = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(dest2.parent().unwrap_or(std::path::Path::new("/")))
                .map_err(|e| CopyError::Failed(format!("{}: {e}", dest2.display())))?;
            let parent = dest2.parent().unwrap_or(std::path::Path::new("/"));
            let tag = job.simple().to_string();
            let partial = files::partial_name(parent, &name, "clone", &tag[..8]);
            let mut progress = Progress::new(d2, job, source.bytes(false));
            package::write(&source, &dest2, &partial, false, &f2, &mut progress).map(|_| ())
        })
        .await
        .unwrap_or_else(|e| Err(CopyError::Failed(format!("clone task: {e}"))));
        drop(guard);
        if let Some(cp) = temp {
            drop_checkpoint(&dd, id, &cp).await;
        }
        let r = match outcome(written) {
            Err(e) => Err(e),
            Ok(()) => {
                let req = ImportRequest {
                    dir: dest.clone(),
                    new_id: true,
                    name: Some(reply_name(&dest)),
                    ..Default::default()
                };
                let registered = match import::plan(&dd, &req) {
                    Ok(plan) if !flag.load(Ordering::SeqCst) => {
                        import::register(&dd, &plan).await.map(|_| ())
                    }
                    Ok(_) => Err("cancelled".into()),
                    Err(e) => Err(e.body.message),
                };
                if registered.is_err() {
                    files::remove_partial(&dest);
                }
                registered
            }
        };
        watcher.abort();
        finish(&dd, job, r);
    });
    Ok((StatusCode::ACCEPTED, Json(reply)))
}

fn reply_name(dest: &std::path::Path) -> String {
    dest.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
