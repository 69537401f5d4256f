//! Import into the inventory (docs/export.md): a VM stored with a given id (or a new one), its
//! MACs and serials kept (or assigned afresh), `off` or `saved` — with the saved state's files
//! copied into its folder before the commit. Same crash rule as create: a folder without a
//! committed row is debris that the next open removes, so a crash never leaves half a VM.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use rusqlite::{params, TransactionBehavior};
use uuid::Uuid;
use vireo_api::{validate_spec, Checkpoint, VmSpec, VmState};

use super::{assign_identity, insert_macs, name_clash, now_ms, to_json, Store, VmRecord};
use crate::checkpoint_store::{insert_tree, Head};
use crate::error::{io, StoreError};
use crate::folders;

/// The saved-state files, in the order they are copied (the state file last: a `saved/` with
/// a state file is complete, as after a save). Everything that goes where `memory.bin` goes
/// (checkpoints, export, import) uses this list (docs/vm-state.md, "Files").
pub const SAVED_FILES: [&str; 4] = ["working-set.bin", "memory.crc", "memory.bin", "vm.state"];

/// Whether a save may lack `name`: the working set (only a live save writes one, and it is
/// only a hint) and the checksum table (saves from before it existed; a save whose state file
/// names a table is refused by the restore without it, so skipping a missing one here never
/// hides damage).
pub fn saved_file_optional(name: &str) -> bool {
    matches!(name, "working-set.bin" | "memory.crc")
}

/// An imported VM's checkpoint tree: records and head on this host's paths (the VM's id
/// already in them), and each checkpoint's state files to copy into its folder.
#[derive(Debug, Default)]
pub struct ImportedTree {
    pub records: Vec<Checkpoint>,
    pub head: Head,
    pub states: Vec<(Uuid, Vec<PathBuf>)>,
}

impl Store {
    /// Stores `spec` as VM `id` (`off`, or `saved` when `saved_from` holds a saved state that
    /// is copied to `<vm-dir>/saved/`), with its checkpoint tree when `tree` is given (records,
    /// head and each checkpoint's state in `<vm-dir>/checkpoints/<id>/`, in the same commit). The spec's MACs must be free; missing ones are
    /// assigned. An id already stored is `IdTaken`.
    pub fn import_vm(
        &self,
        id: Uuid,
        spec: &VmSpec,
        saved_from: Option<&Path>,
        tree: Option<&ImportedTree>,
    ) -> Result<VmRecord, StoreError> {
        validate_spec(spec, &self.limits)?;
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let taken: Option<i64> = tx
            .query_row("SELECT 1 FROM vms WHERE id = ?1", [id.to_string()], |r| {
                r.get(0)
            })
            .ok();
        if taken.is_some() {
            return Err(StoreError::IdTaken { id });
        }
        let mut spec = spec.clone();
        let identity = assign_identity(&tx, id, &mut spec)?;
        let state = if saved_from.is_some() {
            VmState::Saved
        } else {
            VmState::Off
        };
        let now = now_ms();
        let inserted = tx.execute(
            "INSERT INTO vms (id, name, spec, identity, state, state_reason, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6, ?6)",
            params![id.to_string(), spec.name, to_json(&spec), to_json(&identity), state.name(), now],
        );
        inserted.map_err(|e| name_clash(e, &spec.name))?;
        insert_macs(&tx, id, &identity.macs)?;
        let dir = folders::create_vm_dir(&self.vms_dir, id)?;
        let files = (|| {
            if let Some(from) = saved_from {
                copy_saved(from, &dir.join("saved"))?;
            }
            if let Some(tree) = tree {
                for (cp, files) in &tree.states {
                    copy_state(files, &dir.join("checkpoints").join(cp.to_string()))?;
                }
                insert_tree(&tx, id, &tree.records, &tree.head)?;
            }
            Ok(())
        })();
        if let Err(e) = files {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        if let Some(hook) = &self.before_commit {
            hook(id);
        }
        if let Err(e) = tx.commit() {
            let _ = fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        Ok(VmRecord {
            spec,
            identity,
            state,
            created_at: now,
            updated_at: now,
        })
    }
}

fn copy_saved(from: &Path, to: &Path) -> Result<(), StoreError> {
    folders::ensure_private_dir(to)?;
    for name in SAVED_FILES {
        let (src, dst) = (from.join(name), to.join(name));
        if saved_file_optional(name) && !src.exists() {
            continue;
        }
        fs::copy(&src, &dst).map_err(io(&src))?;
        File::open(&dst)
            .and_then(|f| f.sync_all())
            .map_err(io(&dst))?;
    }
    File::open(to).and_then(|d| d.sync_all()).map_err(io(to))
}

fn copy_state(files: &[PathBuf], to: &Path) -> Result<(), StoreError> {
    folders::ensure_private_dir(to.parent().unwrap_or(to))?;
    folders::ensure_private_dir(to)?;
    for src in files {
        let dst = to.join(src.file_name().unwrap_or_default());
        fs::copy(src, &dst).map_err(io(src))?;
        File::open(&dst)
            .and_then(|f| f.sync_all())
            .map_err(io(&dst))?;
    }
    File::open(to).and_then(|d| d.sync_all()).map_err(io(to))
}
