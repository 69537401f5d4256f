//! A storage move's switch record (`<vm-dir>/storage-switch.json`, written by the worker
//! inside the switch's park: `vireo_worker::move_storage::record`) as vireod uses it: the
//! answer to "did the worker switch?" when the worker cannot be asked any more (it ended while
//! vireod was down, or went silent during the move). With it, a guest write made after the
//! switch is never thrown away with the new files (docs/storage-migration.md, "Failure
//! safety").
//!
//! vireod removes the record once the move is recorded in its store: the checkpointed move's
//! commit (`checkpoints::move_live`), the plain move's spec update (`move_storage`), and at
//! startup ([`recover_all`]) for a VM without a worker.

use std::path::PathBuf;
use std::sync::Arc;

use uuid::Uuid;
use vireo_worker::move_storage::record::{self, SwitchRecord};

use super::unused_files::{self, same, Outcome};
use super::Daemon;

/// The VM's record, if its copies are all there (a record naming missing copies says nothing).
pub fn switched(d: &Daemon, vm: Uuid) -> Option<SwitchRecord> {
    record::read(&d.store.vm_dir(vm)).filter(SwitchRecord::copies_exist)
}

/// The move is recorded in the store (or was never made): the worker's word is not needed.
pub fn forget(d: &Daemon, vm: Uuid) {
    record::remove(&d.store.vm_dir(vm));
}

/// A VM without checkpoints whose worker switched and ended unseen: its spec takes the copies
/// (only disks still on the file the record says they left), the old files the worker had not
/// deleted yet go as after any move (never one another VM uses or another process holds
/// locked), and the record goes.
pub fn apply_plain(d: &Daemon, vm: Uuid, rec: &SwitchRecord) -> Result<(), String> {
    let current = d.store.get_by_id(vm).map_err(|e| e.to_string())?;
    let mut spec = current.spec.clone();
    let mut changed = false;
    for (i, moved) in rec.disks.iter().enumerate() {
        let slot = spec
            .disks
            .iter()
            .position(|s| s.serial.is_some() && s.serial == moved.serial)
            .or_else(|| spec.disks.iter().position(|s| same(&s.path, &moved.from)))
            .unwrap_or(i);
        if let Some(disk) = spec.disks.get_mut(slot) {
            if same(&disk.path, &moved.from) {
                tracing::info!(
                    vm = %vm,
                    "disk {} moved to {} before its worker ended",
                    disk.path.display(),
                    moved.to.display()
                );
                disk.path = moved.to.clone();
                changed = true;
            }
        }
    }
    if changed {
        d.store
            .update_spec(vm, &spec)
            .map_err(|e| format!("recording the moved disk paths: {e}"))?;
    }
    let keep: Vec<PathBuf> = spec.disks.iter().map(|s| s.path.clone()).collect();
    let old: Vec<PathBuf> = rec
        .disks
        .iter()
        .flat_map(|m| m.old_files.iter().cloned())
        .collect();
    for (old, outcome) in unused_files::delete(d, vm, &old, &keep) {
        match outcome {
            Outcome::Deleted => {
                tracing::info!(vm = %vm, "deleted old {} of a finished move", old.display())
            }
            Outcome::UsedByAnotherVm => {}
            Outcome::Kept(why) => tracing::warn!(vm = %vm, "old {} kept: {why}", old.display()),
        }
    }
    forget(d, vm);
    Ok(())
}

/// At startup, after re-adoption and the checkpoint intents: every VM without a worker whose
/// record is still there. A checkpointed VM's move was settled by its intent (its record is
/// gone, or names disks its spec already uses); any other takes the copies.
pub async fn recover_all(d: &Arc<Daemon>) {
    let Ok(vms) = d.store.list() else { return };
    for vm in vms {
        let id = vm.id();
        if d.sup.get(id).is_some() || !d.store.vm_dir(id).join(record::SWITCH_RECORD).exists() {
            continue;
        }
        if super::checkpoints::intent_of(d, id).is_some() {
            continue;
        }
        let _g = d.lock_vm(id).await;
        match switched(d, id) {
            Some(rec) => {
                if let Err(e) = apply_plain(d, id, &rec) {
                    tracing::error!(vm = %id, "finishing a storage move its worker switched: {e}");
                }
            }
            None => forget(d, id),
        }
    }
}
