//! `vm move-storage` of a VM with checkpoints (docs/storage-migration.md, "A VM with
//! checkpoints"): the whole checkpoint tree moves, not only the running chain — the VM's disks,
//! every checkpoint's frozen files and the chains under them are copied into the destination,
//! each copy relinked to its parent's copy, and one commit moves the VM's spec, every
//! checkpoint record and the head onto the copies. The old files go only after that commit.
//!
//! Where the files land: the user's own files (base disks) in the destination under their
//! names; the files vireod made (checkpoint children) in `<DIR>/vireo-checkpoints-<vm id>/`,
//! so they stay vireod's (`is_ours`): a checkpoint delete or apply still deletes them when no
//! one needs them. A checkpoint's state and memory stay in vireod's folder for the VM: they are
//! vireod's record of the checkpoint, like `saved/`, not the VM's storage.
//!
//! A VM that is off moves here entirely; a running one (`move_live.rs`) uses the plan and the
//! copy of the frozen files from here, and its worker copies and switches the running tops.
//! The job holds the VM's lock; the intent row keeps checkpoint operations out. Crash safety: intent `Move` (prepared) before the first copy — a restart
//! deletes the copies, the old files were never touched; committed — a restart deletes the old
//! files (`finish`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use uuid::Uuid;
use vireo_api::Vm;
use vireo_vhdx::{OpenOptions, Rebase, Vhdx};

use super::super::http_error::HttpError;
use super::super::Daemon;
use super::{disks, fault_point, is_ours};
use crate::checkpoint_store::{Intent, MovedFile, Top};

/// The folder in a move's destination that holds the files vireod made for VM `vm`.
pub fn moved_dir_name(vm: Uuid) -> String {
    format!("vireo-checkpoints-{vm}")
}

/// The files of a checkpointed VM's move, and the new path of every path the records use for
/// them (a path reached through a parent locator reads `<dir>/../base.vhdx`: one file, two
/// spellings).
pub struct TreeMove {
    /// Each file once, by its resolved path.
    pub files: Vec<MovedFile>,
    /// Every spelling the tree's records and locators use → the new path.
    pub renames: BTreeMap<PathBuf, PathBuf>,
}

pub(crate) fn resolved(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Every file the VM's tree names, with the chains under them: resolved path → the spellings
/// seen for it.
pub(crate) fn tree_files(
    daemon: &Daemon,
    vm: &Vm,
) -> Result<BTreeMap<PathBuf, Vec<PathBuf>>, String> {
    let checkpoints = daemon
        .store
        .list_checkpoints(vm.id())
        .map_err(|e| e.to_string())?;
    let head = daemon
        .store
        .checkpoint_head(vm.id())
        .map_err(|e| e.to_string())?;
    let mut roots: Vec<PathBuf> = vm.spec.disks.iter().map(|d| d.path.clone()).collect();
    roots.extend(checkpoint_roots(&checkpoints, &head.tops));
    tree_files_from(roots, &vm.spec.name)
}

/// Every file a tree's records and tops name (the walk's starting points; the VM's own disks
/// are the caller's to add).
pub(crate) fn checkpoint_roots(
    checkpoints: &[vireo_api::Checkpoint],
    tops: &BTreeMap<String, Top>,
) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    for cp in checkpoints {
        roots.extend(cp.spec.disks.iter().map(|d| d.path.clone()));
        roots.extend(cp.disks.iter().map(|d| d.frozen.clone()));
        roots.extend(cp.disks.iter().filter_map(|d| d.parent_file.clone()));
    }
    roots.extend(
        tops.values()
            .flat_map(|t| [t.file.clone(), t.parent.clone()]),
    );
    roots
}

/// The files under `roots` (each with the chain under it): resolved path → the spellings seen
/// for it. `vm` names the VM in the message about a missing file.
pub(crate) fn tree_files_from(
    roots: Vec<PathBuf>,
    vm: &str,
) -> Result<BTreeMap<PathBuf, Vec<PathBuf>>, String> {
    let mut files: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    for root in roots {
        let mut next = Some(root);
        while let Some(f) = next.take() {
            if !f.exists() {
                return Err(format!(
                    "{} of VM {vm:?}'s checkpoint tree is missing; the tree cannot be moved \
                     whole (`vireo checkpoint list {vm}` shows the checkpoints)",
                    f.display(),
                ));
            }
            let spellings = files.entry(resolved(&f)).or_default();
            let seen = !spellings.is_empty();
            if !spellings.contains(&f) {
                spellings.push(f.clone());
            }
            // A file seen before ends the walk: its chain is in already (no loop can spin).
            if !seen && disks::is_vhdx(&f) {
                next = disks::parent_of_in_use(&f)?;
            }
        }
    }
    Ok(files)
}

/// Where each file of the tree goes in `to`. Refused (409) when two files would get one name
/// or a destination file exists.
pub fn plan(daemon: &Daemon, vm: &Vm, to: &Path) -> Result<TreeMove, HttpError> {
    let files = tree_files(daemon, vm).map_err(HttpError::conflict)?;
    let ours = to.join(moved_dir_name(vm.id()));
    let mut taken: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    let mut plan = TreeMove {
        files: Vec::new(),
        renames: BTreeMap::new(),
    };
    for (from, spellings) in files {
        let name = from
            .file_name()
            .ok_or_else(|| HttpError::conflict(format!("{} has no file name", from.display())))?;
        let dest = if is_ours(daemon, vm.id(), &from) {
            ours.join(name)
        } else {
            to.join(name)
        };
        if let Some(other) = taken.insert(dest.clone(), from.clone()) {
            return Err(HttpError::conflict(format!(
                "{} and {} of VM {:?}'s checkpoint tree would both be {}; rename one of them \
                 or delete the checkpoints that use it",
                other.display(),
                from.display(),
                vm.spec.name,
                dest.display()
            )));
        }
        if dest.exists() {
            return Err(HttpError::conflict(format!(
                "{} exists already; choose another destination or remove it",
                dest.display()
            )));
        }
        for s in spellings {
            plan.renames.insert(s, dest.clone());
        }
        plan.renames.insert(from.clone(), dest.clone());
        plan.files.push(MovedFile { from, to: dest });
    }
    Ok(plan)
}

/// What [`run`] answers when cancelled (the worker's copy helper's word).
pub const CANCELLED: &str = "cancelled";

/// Copies, relinks, commits, then deletes the old files. Blocking. `copied` counts bytes for
/// the job's progress; `keep` are files other VMs use (never deleted). Before the commit a
/// failure or cancel deletes the copies and leaves the VM on its old files.
pub fn run(
    daemon: &Daemon,
    vm: &Vm,
    tree: &TreeMove,
    keep: &[PathBuf],
    cancel: &AtomicBool,
    copied: &AtomicU64,
) -> Result<(), String> {
    let files = &tree.files;
    super::begin_intent(
        daemon,
        vm,
        &Intent::Move {
            files: files.to_vec(),
            live: None,
        },
    )?;
    fault_point("move-intent");
    let mut created = Vec::new();
    if let Err(e) = copy_tree(files, &[], &mut created, cancel, copied) {
        vireo_worker::move_storage::remove_created(&created);
        remove_moved_dir(vm.id(), files);
        let _ = daemon.store.clear_checkpoint_intent(vm.id());
        return Err(e);
    }
    fault_point("move-copied");
    if let Err(e) = daemon.store.commit_checkpoint_move(vm.id(), &tree.renames) {
        // Not committed: the VM is on its old files, so the copies go now, not at a restart.
        roll_back(daemon, vm.id(), files);
        return Err(format!(
            "the move could not be recorded ({e}); the VM stays on its old files"
        ));
    }
    fault_point("move-commit");
    finish(daemon, vm.id(), files, keep);
    Ok(())
}

/// Copies every file but those in `skip` (a running VM's tops: its worker copies them), each
/// copy relinked to its parent's copy, and checks that every copy opens with its chain.
pub(super) fn copy_tree(
    files: &[MovedFile],
    skip: &[PathBuf],
    created: &mut Vec<PathBuf>,
    cancel: &AtomicBool,
    copied: &AtomicU64,
) -> Result<(), String> {
    let files: Vec<&MovedFile> = files.iter().filter(|f| !skip.contains(&f.from)).collect();
    for f in &files {
        if let Some(dir) = f.to.parent() {
            if !dir.exists() {
                std::fs::create_dir(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
        }
        let progress = |n: u64| {
            copied.fetch_add(n, Ordering::Relaxed);
        };
        vireo_worker::move_storage::copy_file_sparse(&f.from, &f.to, created, cancel, &progress)?;
    }
    let copy_of: BTreeMap<PathBuf, &Path> = files
        .iter()
        .map(|f| (f.from.clone(), f.to.as_path()))
        .collect();
    let never = AtomicBool::new(false);
    for f in files.iter().filter(|f| disks::is_vhdx(&f.from)) {
        let Some(parent) = disks::parent_of(&f.from)? else {
            continue;
        };
        let new_parent = copy_of.get(&resolved(&parent)).ok_or_else(|| {
            format!(
                "the parent {} of {} was not copied",
                parent.display(),
                f.from.display()
            )
        })?;
        Vhdx::rebase(&f.to, Rebase::Relink(new_parent), &|_, _| {}, &never).map_err(|e| {
            format!(
                "relinking {} to {}: {e}",
                f.to.display(),
                new_parent.display()
            )
        })?;
    }
    // Every copy opens with its whole chain: no locator still points at an old file.
    for f in files.iter().filter(|f| disks::is_vhdx(&f.to)) {
        Vhdx::open(&f.to, &OpenOptions::read_only())
            .map_err(|e| format!("the copy {} does not open: {e}", f.to.display()))?;
    }
    Ok(())
}

/// After the commit (also at a restart): the old files go, except those other VMs use or
/// another process holds locked; then the intent. Idempotent.
pub fn finish(daemon: &Daemon, vm: Uuid, files: &[MovedFile], keep: &[PathBuf]) {
    for f in files {
        if keep.contains(&f.from) || !f.from.exists() {
            continue;
        }
        if let Err(e) = vireo_worker::move_storage::delete_if_unused(&f.from) {
            tracing::warn!(vm = %vm, "the move kept {}: {e}", f.from.display());
        }
    }
    if let Err(e) = daemon.store.clear_checkpoint_intent(vm) {
        tracing::warn!(vm = %vm, "cannot clear the move's intent: {e}");
    }
}

/// A prepared move cut short: the copies go (never a file the VM or a checkpoint names), the
/// VM was never changed.
pub fn roll_back(daemon: &Daemon, vm: Uuid, files: &[MovedFile]) {
    let used = super::recover::files_in_use(daemon, vm);
    for f in files.iter().filter(|f| !used.contains(&f.to)) {
        disks::remove(&f.to);
    }
    remove_moved_dir(vm, files);
    let _ = daemon.store.clear_checkpoint_intent(vm);
}

/// The destination's folder for vireod's files, if the move made one (only when empty).
fn remove_moved_dir(vm: Uuid, files: &[MovedFile]) {
    let name = moved_dir_name(vm);
    if let Some(dir) = files
        .iter()
        .find_map(|f| f.to.parent().filter(|p| p.ends_with(&name)))
    {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Drives [`run`] on a blocking thread for the move's job: progress from the bytes copied,
/// the job's cancel passed on. Err(CANCELLED) when cancelled before the commit.
pub async fn drive(
    daemon: &Arc<Daemon>,
    vm: &Vm,
    tree: TreeMove,
    keep: Vec<PathBuf>,
    job: Uuid,
    cancel: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let total: u64 = tree
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(&f.from).ok())
        .map(|m| m.len())
        .sum::<u64>()
        .max(1);
    let stop = Arc::new(AtomicBool::new(false));
    let copied = Arc::new(AtomicU64::new(0));
    let (d, vm2, stop2, copied2) = (daemon.clone(), vm.clone(), stop.clone(), copied.clone());
    let work = tokio::task::spawn_blocking(move || run(&d, &vm2, &tree, &keep, &stop2, &copied2));
    tokio::pin!(work);
    let mut cancel_wait = Box::pin(super::super::jobs::cancelled(cancel));
    let mut asked = false;
    loop {
        tokio::select! {
            r = &mut work => {
                return match r {
                    Ok(Err(e)) if e == CANCELLED => Err(CANCELLED.into()),
                    Ok(r) => r,
                    Err(e) => Err(format!("the copy task failed: {e}")),
                };
            }
            () = &mut cancel_wait, if !asked => {
                asked = true;
                stop.store(true, Ordering::SeqCst);
            }
            () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                let pct = (copied.load(Ordering::Relaxed).min(total) * 99 / total).max(1);
                let _ = daemon.store.set_job_progress(job, pct as u8);
            }
        }
    }
}
