//! Checkpoints through vireod (Hyper-V standard checkpoints; docs/checkpoints.md).
//!
//! A checkpoint freezes each read-write VHDX disk's file of the moment: the VM goes on in a
//! new differencing child (`<vm-dir>/checkpoints/disks/`), so the frozen file is never written
//! while the checkpoint exists. It keeps the VM's spec and, for a running, paused or saved VM,
//! its state and memory (`<vm-dir>/checkpoints/<id>/`).
//!
//! Crash safety: every create/apply/delete records an intent (schema step 5) before it makes
//! its first file, changes the VM's spec, the tree and the intent's phase in one transaction
//! ("commit"), and only then does the clean-up a commit makes due. `recover` (at startup)
//! rolls a prepared intent back (its files go, the VM is untouched) and finishes a committed
//! one. Each step is idempotent, so recovery may itself be cut short and run again.
//!
//! Locking: each operation holds the VM's lock for its file work (a start then answers 409
//! busy); the intent row also keeps a second checkpoint operation of the same VM out.

pub mod apply;
pub mod apply_live;
pub mod auto;
pub mod create;
pub mod delete;
pub mod disks;
pub mod live;
pub mod move_live;
pub mod move_tree;
pub mod recover;

use std::path::{Path, PathBuf};

use uuid::Uuid;
use vireo_api::{Checkpoint, Vm};

use super::http_error::HttpError;
use super::Daemon;
use vireo_api::ApiErrorCode;

/// `<vm-dir>/checkpoints/`.
pub fn root(daemon: &Daemon, vm: Uuid) -> PathBuf {
    daemon.store.vm_dir(vm).join("checkpoints")
}

/// Where a checkpoint keeps the VM's state and memory.
pub fn state_dir(daemon: &Daemon, vm: Uuid, cp: Uuid) -> PathBuf {
    root(daemon, vm).join(cp.to_string())
}

/// A new differencing child's name for disk `serial` on `parent` (unique per operation `op`).
///
/// It goes where the VM's storage is: after a storage move (`move_tree`) that is the move's
/// `vireo-checkpoints-<vm id>/` folder — beside `parent`, or beside the user's moved base —
/// else `<vm-dir>/checkpoints/disks/`. Callers ask again at commit time, so the answer depends
/// only on what does not change during an operation.
pub fn child_path(daemon: &Daemon, vm: Uuid, serial: &str, op: Uuid, parent: &Path) -> PathBuf {
    let short = &op.simple().to_string()[..12];
    let safe: String = serial
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let moved = move_tree::moved_dir_name(vm);
    let dir = parent.parent().and_then(|dir| {
        if dir.file_name().and_then(|n| n.to_str()) == Some(moved.as_str()) {
            Some(dir.to_path_buf())
        } else {
            Some(dir.join(&moved)).filter(|d| d.is_dir())
        }
    });
    dir.unwrap_or_else(|| root(daemon, vm).join("disks"))
        .join(format!("{safe}-{short}.avhdx"))
}

/// The checkpoint operation (or tree move) the VM has under way, if any.
pub fn intent_of(daemon: &Daemon, vm: Uuid) -> Option<crate::checkpoint_store::Intent> {
    let all = daemon.store.checkpoint_intents().ok()?;
    all.into_iter()
        .find(|(id, ..)| *id == vm)
        .map(|(_, i, _)| i)
}

/// A checkpoint create, apply or delete asked for while the VM's storage moves: refused (it
/// would make or merge files the move is copying), not queued behind the move.
pub fn refuse_during_move(daemon: &Daemon, vm: &Vm) -> Result<(), HttpError> {
    if let Some(crate::checkpoint_store::Intent::Move { .. }) = intent_of(daemon, vm.id()) {
        return Err(HttpError::conflict(format!(
            "VM {:?} is moving its storage (vireo vm move-storage); checkpoint operations \
             are refused until the move's job has finished (`vireo job list`), then retry",
            vm.spec.name
        )));
    }
    Ok(())
}

/// Files vireod made itself (children in the VM's folder, or in the folder a storage move put
/// them in, `move_tree`): the only ones it ever deletes.
pub fn is_ours(daemon: &Daemon, vm: Uuid, file: &Path) -> bool {
    // Resolved first: a parent locator's path `<vm-dir>/checkpoints/disks/../../../base.vhdx`
    // starts with the folder but names the user's file.
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let file = real(file);
    file.starts_with(real(&root(daemon, vm).join("disks")))
        || file
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|dir| dir.to_str() == Some(move_tree::moved_dir_name(vm).as_str()))
}

pub fn find(daemon: &Daemon, vm: &Vm, key: &str) -> Result<Checkpoint, HttpError> {
    daemon.store.find_checkpoint(vm.id(), key)?.ok_or_else(|| {
        HttpError::new(
            ApiErrorCode::NotFound,
            format!(
                "VM {:?} has no checkpoint {key:?} (neither an id nor a name); \
                 `vireo checkpoint list {}` shows them",
                vm.spec.name, vm.spec.name
            ),
        )
    })
}

/// Test hook: with `VIREO_CHECKPOINT_FAULT=<point>` vireod dies (abort, like a SIGKILL: no
/// clean-up runs) when it reaches that point, so the crash tests can stop it anywhere.
pub fn fault_point(point: &str) {
    if std::env::var("VIREO_CHECKPOINT_FAULT").is_ok_and(|p| p == point) {
        tracing::error!("fault injection: dying at {point}");
        std::process::abort();
    }
}

/// Records `intent` as the VM's one checkpoint operation under way (what a restart finishes or
/// rolls back); another one already recorded is refused.
pub fn begin_intent(
    daemon: &Daemon,
    vm: &Vm,
    intent: &crate::checkpoint_store::Intent,
) -> Result<(), String> {
    if daemon
        .store
        .begin_checkpoint_intent(vm.id(), intent)
        .map_err(|e| e.to_string())?
    {
        Ok(())
    } else {
        Err(format!(
            "VM {:?} has another checkpoint operation in progress",
            vm.spec.name
        ))
    }
}

pub fn busy(vm: &Vm) -> HttpError {
    HttpError::conflict(format!(
        "VM {:?} has another checkpoint operation in progress; wait for its job",
        vm.spec.name
    ))
}
