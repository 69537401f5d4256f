//! Checkpoints in the store (schema step 5, docs/checkpoints.md): the tree rows, each VM's head
//! (the checkpoint it runs from and the differencing children vireod made for it) and the one
//! intent in flight per VM. Every change is one IMMEDIATE transaction under the store's lock,
//! and each "commit" of an operation changes the VM's spec, the tree and the intent's phase in
//! the same transaction, so a crash leaves either the old or the new VM, never a mix.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vireo_api::{Checkpoint, CheckpointDisk, VmSpec, VmState};

use crate::error::StoreError;
use crate::store::{assign_identity, insert_macs, load, now_ms, to_json, Store};

/// A differencing child vireod made for the VM to run on (the `tops` of a head).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Top {
    /// The file the VM writes.
    pub file: PathBuf,
    /// Its parent file (a checkpoint's frozen file).
    pub parent: PathBuf,
}

/// Where the VM stands in its tree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub current: Option<Uuid>,
    /// By disk serial.
    pub tops: BTreeMap<String, Top>,
}

/// A live merge or offline merge that a delete still owes: `top` (the VM's file) goes into
/// `frozen` (the deleted checkpoint's file), after which the VM runs on `frozen`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingMerge {
    pub serial: String,
    pub frozen: PathBuf,
    pub top: PathBuf,
    /// `frozen`'s own parent, the VM top's parent once merged.
    pub frozen_parent: Option<PathBuf>,
}

/// An operation in flight, written before it makes its first file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Intent {
    Create {
        checkpoint: Uuid,
        /// Files this create makes (removed on roll-back unless the VM's spec uses them).
        children: Vec<PathBuf>,
        state_dir: PathBuf,
        /// A live capture (the VM's worker makes the children and the state): the checkpoint
        /// as it will be committed, so that recovery can finish it when the worker did its
        /// part (docs/checkpoints.md, "Crash safety").
        #[serde(default, skip_serializing_if = "Option::is_none")]
        live: Option<Box<Checkpoint>>,
    },
    Apply {
        checkpoint: Uuid,
        children: Vec<PathBuf>,
        /// The VM's files before the apply that no checkpoint froze: deleted once committed.
        discard: Vec<PathBuf>,
        /// The checkpoint's state staged as the VM's saved state (`saved.apply/`).
        staged: Option<PathBuf>,
        /// Applied in the running VM's worker (`apply_live.rs`): the worker makes the
        /// children, and what it did decides a recovery.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        live: bool,
    },
    Delete {
        merges: Vec<PendingMerge>,
        /// Frozen files nobody needs any more, and the deleted checkpoints' state folders.
        remove: Vec<PathBuf>,
    },
    /// `vm move-storage` of a VM with checkpoints (`daemon/checkpoints/move_tree.rs`): every
    /// file of its tree is copied before the commit; the `from` files go after it.
    Move {
        files: Vec<MovedFile>,
        /// A running VM's move (`move_live.rs`): its worker makes the running tops' copies
        /// and switches to them, and what it did decides a recovery.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        live: Option<LiveMove>,
    },
}

/// The part of a running VM's tree move that its worker does, and what the commit needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveMove {
    /// The files the VM runs on (`files`' `from`), copied by the worker, not by vireod.
    pub tops: Vec<PathBuf>,
    /// Every spelling the records use → its new path (`move_tree::TreeMove::renames`), so a
    /// recovery can commit the move the worker finished.
    pub renames: BTreeMap<PathBuf, PathBuf>,
}

/// One file of a checkpointed VM's storage move: `from` is copied to `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedFile {
    pub from: PathBuf,
    pub to: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Prepared,
    Committed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Prepared => "prepared",
            Phase::Committed => "committed",
        }
    }
}

type Row = (
    String,
    String,
    Option<String>,
    i64,
    String,
    String,
    i64,
    i64,
);

fn to_checkpoint(vm: Uuid, current: Option<Uuid>, r: Row) -> Result<Checkpoint, StoreError> {
    let (id, name, parent, created_at, spec, disks, has_state, automatic) = r;
    let corrupt = |detail: String| StoreError::Corrupt {
        id: format!("checkpoint {id}"),
        detail,
    };
    let id = Uuid::parse_str(&id).map_err(|e| corrupt(e.to_string()))?;
    Ok(Checkpoint {
        id,
        vm_id: vm,
        name,
        parent: parent.and_then(|p| Uuid::parse_str(&p).ok()),
        created_at,
        spec: serde_json::from_str(&spec).map_err(|e| corrupt(format!("spec: {e}")))?,
        disks: serde_json::from_str::<Vec<CheckpointDisk>>(&disks)
            .map_err(|e| corrupt(format!("disks: {e}")))?,
        has_state: has_state != 0,
        current: current == Some(id),
        automatic: automatic != 0,
        capture: None,
    })
}

fn head_tx(tx: &rusqlite::Connection, vm: Uuid) -> Result<Head, StoreError> {
    let row: Option<(Option<String>, String)> = tx
        .query_row(
            "SELECT current, tops FROM checkpoint_heads WHERE vm_id = ?1",
            [vm.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((current, tops)) = row else {
        return Ok(Head::default());
    };
    Ok(Head {
        current: current.and_then(|c| Uuid::parse_str(&c).ok()),
        tops: serde_json::from_str(&tops).map_err(|e| StoreError::Corrupt {
            id: vm.to_string(),
            detail: format!("checkpoint head: {e}"),
        })?,
    })
}

/// One checkpoint's row, as VM `vm`'s (a tree arriving whole carries the ids of the VM it
/// left; the row belongs to the VM that stores it).
fn insert_record(tx: &Transaction, vm: Uuid, cp: &Checkpoint) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO checkpoints
         (id, vm_id, name, parent, created_at, spec, disks, has_state, automatic)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            cp.id.to_string(),
            vm.to_string(),
            cp.name,
            cp.parent.map(|p| p.to_string()),
            cp.created_at,
            to_json(&cp.spec),
            to_json(&cp.disks),
            cp.has_state as i64,
            cp.automatic as i64
        ],
    )
}

/// Every record and the head of a tree arriving whole (a migration's, an import's), in the
/// caller's transaction.
pub(crate) fn insert_tree(
    tx: &Transaction,
    vm: Uuid,
    checkpoints: &[Checkpoint],
    head: &Head,
) -> Result<(), StoreError> {
    for cp in checkpoints {
        insert_record(tx, vm, cp)?;
    }
    put_head(tx, vm, head)
}

fn put_head(tx: &Transaction, vm: Uuid, head: &Head) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO checkpoint_heads (vm_id, current, tops) VALUES (?1, ?2, ?3)
         ON CONFLICT(vm_id) DO UPDATE SET current = ?2, tops = ?3",
        params![
            vm.to_string(),
            head.current.map(|c| c.to_string()),
            to_json(&head.tops)
        ],
    )?;
    Ok(())
}

/// Replaces the VM's spec (and its state, when given) inside `tx`, as `Store::update_spec`
/// does: MACs re-registered, identity recomputed.
fn put_spec(
    tx: &Transaction,
    vm: Uuid,
    spec: &VmSpec,
    state: Option<&VmState>,
) -> Result<(), StoreError> {
    let old = load(tx, vm)?;
    let mut spec = spec.clone();
    // The name is the VM's, not the checkpoint's: a VM renamed since keeps its new name.
    spec.name = old.spec.name.clone();
    // So is the automatic checkpoint setting: applying an older checkpoint must not turn off
    // the protection the user set since (or turn on one they turned off).
    spec.auto_checkpoint = old.spec.auto_checkpoint.clone();
    let state = state.unwrap_or(&old.state);
    if spec == old.spec && *state == old.state {
        // Nothing changes (a VM without VHDX disks): the row, and its updated_at, stay.
        return Ok(());
    }
    tx.execute("DELETE FROM nic_macs WHERE vm_id = ?1", [vm.to_string()])?;
    let identity = assign_identity(tx, vm, &mut spec)?;
    tx.execute(
        "UPDATE vms SET spec = ?2, identity = ?3, state = ?4, state_reason = ?5, updated_at = ?6
         WHERE id = ?1",
        params![
            vm.to_string(),
            to_json(&spec),
            to_json(&identity),
            state.name(),
            state.reason(),
            now_ms()
        ],
    )?;
    insert_macs(tx, vm, &identity.macs)?;
    Ok(())
}

fn set_phase(tx: &Transaction, vm: Uuid, phase: Phase) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE checkpoint_intents SET phase = ?2 WHERE vm_id = ?1",
        params![vm.to_string(), phase.name()],
    )?;
    Ok(())
}

impl Store {
    /// The VM's checkpoints, oldest first, with `current` set on the one it runs from.
    pub fn list_checkpoints(&self, vm: Uuid) -> Result<Vec<Checkpoint>, StoreError> {
        let conn = self.lock();
        let current = head_tx(&conn, vm)?.current;
        let mut stmt = conn.prepare(
            "SELECT id, name, parent, created_at, spec, disks, has_state, automatic FROM checkpoints
             WHERE vm_id = ?1 ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([vm.to_string()], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for r in rows {
            out.push(to_checkpoint(vm, current, r?)?);
        }
        Ok(out)
    }

    pub fn checkpoint_head(&self, vm: Uuid) -> Result<Head, StoreError> {
        head_tx(&self.lock(), vm)
    }

    /// By id if `key` is one of the VM's, else by name.
    pub fn find_checkpoint(&self, vm: Uuid, key: &str) -> Result<Option<Checkpoint>, StoreError> {
        Ok(self
            .list_checkpoints(vm)?
            .into_iter()
            .find(|c| c.id.to_string() == key || c.name == key))
    }

    /// Records `intent` (prepared); false when the VM already has one in flight.
    pub fn begin_checkpoint_intent(&self, vm: Uuid, intent: &Intent) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "INSERT OR IGNORE INTO checkpoint_intents (vm_id, intent, phase) VALUES (?1, ?2, ?3)",
            params![vm.to_string(), to_json(intent), Phase::Prepared.name()],
        )?;
        tx.commit()?;
        Ok(n == 1)
    }

    /// Every VM's intent in flight (startup recovery).
    pub fn checkpoint_intents(&self) -> Result<Vec<(Uuid, Intent, Phase)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT vm_id, intent, phase FROM checkpoint_intents")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for r in rows {
            let (vm, intent, phase) = r?;
            let corrupt = |detail: String| StoreError::Corrupt {
                id: vm.clone(),
                detail,
            };
            let id = Uuid::parse_str(&vm).map_err(|e| corrupt(e.to_string()))?;
            let intent =
                serde_json::from_str(&intent).map_err(|e| corrupt(format!("intent: {e}")))?;
            let phase = if phase == "committed" {
                Phase::Committed
            } else {
                Phase::Prepared
            };
            out.push((id, intent, phase));
        }
        Ok(out)
    }

    pub fn clear_checkpoint_intent(&self, vm: Uuid) -> Result<(), StoreError> {
        self.lock().execute(
            "DELETE FROM checkpoint_intents WHERE vm_id = ?1",
            [vm.to_string()],
        )?;
        Ok(())
    }

    /// The create's commit: the row, the VM's spec on its new children, the head, phase
    /// committed. Ok(false) when the name is taken (nothing changed).
    pub fn commit_checkpoint_create(
        &self,
        cp: &Checkpoint,
        spec: &VmSpec,
        head: &Head,
    ) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let r = insert_record(&tx, cp.vm_id, cp);
        if let Err(rusqlite::Error::SqliteFailure(f, _)) = &r {
            if f.code == rusqlite::ErrorCode::ConstraintViolation {
                return Ok(false);
            }
        }
        r?;
        put_spec(&tx, cp.vm_id, spec, None)?;
        put_head(&tx, cp.vm_id, head)?;
        set_phase(&tx, cp.vm_id, Phase::Committed)?;
        tx.commit()?;
        Ok(true)
    }

    /// The apply's commit: the VM's spec and state, the head, phase committed.
    pub fn commit_checkpoint_apply(
        &self,
        vm: Uuid,
        spec: &VmSpec,
        state: Option<&VmState>,
        head: &Head,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        put_spec(&tx, vm, spec, state)?;
        put_head(&tx, vm, head)?;
        set_phase(&tx, vm, Phase::Committed)?;
        tx.commit()?;
        Ok(())
    }

    /// The delete's commit: the rows go, their children hang from their parent, the head
    /// moves up, and the work still owed (`intent`) is recorded, committed, in one step.
    pub fn commit_checkpoint_delete(
        &self,
        vm: Uuid,
        gone: &[Uuid],
        head: &Head,
        intent: &Intent,
    ) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "INSERT OR IGNORE INTO checkpoint_intents (vm_id, intent, phase) VALUES (?1, ?2, ?3)",
            params![vm.to_string(), to_json(intent), Phase::Committed.name()],
        )?;
        if n == 0 {
            return Ok(false);
        }
        for id in gone {
            let parent: Option<String> = tx
                .query_row(
                    "SELECT parent FROM checkpoints WHERE id = ?1",
                    [id.to_string()],
                    |r| r.get(0),
                )
                .optional()?
                .flatten();
            tx.execute(
                "UPDATE checkpoints SET parent = ?2 WHERE parent = ?1",
                params![id.to_string(), parent],
            )?;
            tx.execute("DELETE FROM checkpoints WHERE id = ?1", [id.to_string()])?;
        }
        put_head(&tx, vm, head)?;
        tx.commit()?;
        Ok(true)
    }

    /// Ok(false) when the VM has another checkpoint of that name.
    pub fn rename_checkpoint(&self, vm: Uuid, id: Uuid, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let r = tx.execute(
            "UPDATE checkpoints SET name = ?3 WHERE id = ?1 AND vm_id = ?2",
            params![id.to_string(), vm.to_string(), name],
        );
        if let Err(rusqlite::Error::SqliteFailure(f, _)) = &r {
            if f.code == rusqlite::ErrorCode::ConstraintViolation {
                return Ok(false);
            }
        }
        r?;
        tx.commit()?;
        Ok(true)
    }

    /// A migrated VM's tree arriving (`daemon/migrate/tree.rs`): every record and the head in
    /// one transaction, paths already this host's.
    pub fn import_checkpoints(
        &self,
        vm: Uuid,
        checkpoints: &[Checkpoint],
        head: &Head,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        insert_tree(&tx, vm, checkpoints, head)?;
        tx.commit()?;
        Ok(())
    }

    /// The storage move's commit: the VM's spec, every checkpoint's spec and frozen files and
    /// the head's tops name the copies (`moved`: old path → new path), phase committed.
    pub fn commit_checkpoint_move(
        &self,
        vm: Uuid,
        moved: &BTreeMap<PathBuf, PathBuf>,
    ) -> Result<(), StoreError> {
        let follow = |p: &mut PathBuf| {
            if let Some(new) = moved.get(p.as_path()) {
                *p = new.clone();
            }
        };
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut spec = load(&tx, vm)?.spec;
        spec.disks.iter_mut().for_each(|d| follow(&mut d.path));
        put_spec(&tx, vm, &spec, None)?;
        let rows: Vec<(String, String, String)> = {
            let mut stmt =
                tx.prepare("SELECT id, spec, disks FROM checkpoints WHERE vm_id = ?1")?;
            let rows =
                stmt.query_map([vm.to_string()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (id, cp_spec, cp_disks) in rows {
            let corrupt = |detail: String| StoreError::Corrupt {
                id: format!("checkpoint {id}"),
                detail,
            };
            let mut cp_spec: VmSpec =
                serde_json::from_str(&cp_spec).map_err(|e| corrupt(format!("spec: {e}")))?;
            let mut cp_disks: Vec<CheckpointDisk> =
                serde_json::from_str(&cp_disks).map_err(|e| corrupt(format!("disks: {e}")))?;
            cp_spec.disks.iter_mut().for_each(|d| follow(&mut d.path));
            for d in &mut cp_disks {
                follow(&mut d.frozen);
                if let Some(p) = d.parent_file.as_mut() {
                    follow(p);
                }
            }
            tx.execute(
                "UPDATE checkpoints SET spec = ?2, disks = ?3 WHERE id = ?1",
                params![id, to_json(&cp_spec), to_json(&cp_disks)],
            )?;
        }
        let mut head = head_tx(&tx, vm)?;
        for top in head.tops.values_mut() {
            follow(&mut top.file);
            follow(&mut top.parent);
        }
        put_head(&tx, vm, &head)?;
        set_phase(&tx, vm, Phase::Committed)?;
        tx.commit()?;
        Ok(())
    }

    /// After a merge: the disk `serial` of the VM is the file `path` now, and the head's top
    /// for it is `top` (or none).
    pub fn checkpoint_disk_moved(
        &self,
        vm: Uuid,
        serial: &str,
        path: &std::path::Path,
        top: Option<Top>,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut spec = load(&tx, vm)?.spec;
        for d in &mut spec.disks {
            if d.serial.as_deref() == Some(serial) {
                d.path = path.to_path_buf();
            }
        }
        put_spec(&tx, vm, &spec, None)?;
        let mut head = head_tx(&tx, vm)?;
        match top {
            Some(t) => head.tops.insert(serial.to_owned(), t),
            None => head.tops.remove(serial),
        };
        put_head(&tx, vm, &head)?;
        tx.commit()?;
        Ok(())
    }
}
