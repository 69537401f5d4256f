//! The inventory: VMs (spec, identity, state) in `<state_dir>/vireo.db`, each with a folder
//! `<state_dir>/vms/<id>/`.
//!
//! Locking: one `Store` per state directory, enforced by an exclusive lock on `vireo.lock` (a
//! second vireod on the same directory is refused, and the orphan cleanup at open cannot race a
//! live create). Inside, one `Mutex<Connection>`; every change is one IMMEDIATE transaction, so
//! two conflicting requests serialize and the loser sees the winner's result (NameTaken,
//! IllegalTransition).
//!
//! Crash rule: a VM exists iff its row is committed. Create inserts the rows, makes the folder,
//! then commits (the folder is removed if the commit fails); a crash in between leaves a folder
//! without a row, which `open` removes. Remove commits first, then deletes the folder.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use uuid::Uuid;
use vireo_api::{
    transition, validate_spec, validate_vm_name, Action, Limits, MacAddr, VmIdentity, VmSpec,
    VmState,
};

use crate::error::{io, StoreError};
use crate::{folders, schema};

mod import;
pub use import::{saved_file_optional, ImportedTree, SAVED_FILES};

/// Limits when the caller passes none; vireod passes the host's own (CPUs, RAM).
pub const DEFAULT_LIMITS: Limits = Limits {
    max_vcpus: 255,
    max_memory_bytes: 1 << 40,
};

/// One VM as stored (the API's `Vm`).
pub type VmRecord = vireo_api::Vm;

type Hook = Box<dyn Fn(Uuid) + Send + Sync>;

pub struct Store {
    conn: Mutex<Connection>,
    vms_dir: PathBuf,
    limits: Limits,
    /// Holds the directory lock for the store's lifetime.
    _lock: File,
    before_commit: Option<Hook>,
}

const COLUMNS: &str = "spec, identity, state, state_reason, created_at, updated_at";

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        Self::open_with(state_dir, DEFAULT_LIMITS)
    }

    pub fn open_with(state_dir: &Path, limits: Limits) -> Result<Store, StoreError> {
        folders::ensure_private_dir(state_dir)?;
        let lock_path = state_dir.join("vireo.lock");
        let lock = private_file(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    dir: state_dir.to_owned(),
                    lock: lock_path,
                })
            }
            Err(TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let db = state_dir.join("vireo.db");
        private_file(&db)?;
        let mut conn = Connection::open(&db)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(db = %db.display(), mode, "WAL journal not available");
        }
        conn.pragma_update(None, "foreign_keys", true)?;
        // The inventory changes rarely; every commit durable is worth its fsync.
        conn.pragma_update(None, "synchronous", "FULL")?;
        schema::migrate(&mut conn, &db)?;
        crate::jobs::fail_orphaned_jobs(&conn)?;

        let vms_dir = state_dir.join("vms");
        folders::ensure_private_dir(&vms_dir)?;
        let known: HashSet<Uuid> = {
            let mut stmt = conn.prepare("SELECT id FROM vms")?;
            let ids = stmt.query_map([], |r| r.get::<_, String>(0))?;
            ids.filter_map(|id| id.ok().and_then(|id| Uuid::parse_str(&id).ok()))
                .collect()
        };
        let removed = folders::remove_orphans(&vms_dir, &known)?;
        if !removed.is_empty() {
            tracing::warn!(count = removed.len(), ids = ?removed, "removed folders of uncommitted VMs");
        }
        Ok(Store {
            conn: Mutex::new(conn),
            vms_dir,
            limits,
            _lock: lock,
            before_commit: None,
        })
    }

    /// The directory the store was opened in (`vms/` is inside it).
    pub fn state_dir(&self) -> &Path {
        self.vms_dir.parent().unwrap_or(&self.vms_dir)
    }

    /// Test hook: runs after a create's folder exists and before its commit (fault injection).
    #[doc(hidden)]
    pub fn set_before_commit_hook(&mut self, hook: impl Fn(Uuid) + Send + Sync + 'static) {
        self.before_commit = Some(Box::new(hook));
    }

    /// The folder holding the VM's files.
    pub fn vm_dir(&self, id: Uuid) -> PathBuf {
        folders::vm_dir(&self.vms_dir, id)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic mid-transaction rolled it back (Transaction's drop); the connection is sound.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates `spec`, assigns the VM's identity (id, missing MACs and disk serials) and stores
    /// it, `Off`, with its folder — all or nothing.
    pub fn create_vm(&self, spec: &VmSpec) -> Result<VmRecord, StoreError> {
        self.create_vm_in_pool(spec, None)
    }

    /// `create_vm`, the VM joining pool `pool` (id or name) in the same transaction: a missing
    /// pool creates nothing.
    pub fn create_vm_in_pool(
        &self,
        spec: &VmSpec,
        pool: Option<&str>,
    ) -> Result<VmRecord, StoreError> {
        self.insert_vm(spec, pool, Uuid::new_v4(), VmState::Off)
    }

    /// A VM arriving by migration: the source's id and normalized spec (its MACs and serials),
    /// state `incoming`. Refused like a create when the name, the id or a MAC is taken here.
    pub fn create_incoming(&self, id: Uuid, spec: &VmSpec) -> Result<VmRecord, StoreError> {
        if self.get_by_id(id).is_ok() {
            return Err(StoreError::IdTaken { id });
        }
        self.insert_vm(spec, None, id, VmState::Incoming)
    }

    fn insert_vm(
        &self,
        spec: &VmSpec,
        pool: Option<&str>,
        id: Uuid,
        state: VmState,
    ) -> Result<VmRecord, StoreError> {
        validate_spec(spec, &self.limits)?;
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut spec = spec.clone();
        let identity = assign_identity(&tx, id, &mut spec)?;
        let now = now_ms();
        let inserted = tx.execute(
            "INSERT INTO vms (id, name, spec, identity, state, state_reason, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6, ?6)",
            params![id.to_string(), spec.name, to_json(&spec), to_json(&identity), state.name(), now],
        );
        inserted.map_err(|e| name_clash(e, &spec.name))?;
        insert_macs(&tx, id, &identity.macs)?;
        if let Some(pool) = pool {
            crate::pool_store::join_by_key(&tx, pool, id)?;
        }
        let dir = folders::create_vm_dir(&self.vms_dir, id)?;
        if let Some(hook) = &self.before_commit {
            hook(id);
        }
        if let Err(e) = tx.commit() {
            let _ = fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        let record = VmRecord {
            spec,
            identity,
            state,
            created_at: now,
            updated_at: now,
        };
        Ok(record)
    }

    pub fn get_by_id(&self, id: Uuid) -> Result<VmRecord, StoreError> {
        let conn = self.lock();
        let sql = format!("SELECT id, {COLUMNS} FROM vms WHERE id = ?1");
        let row = conn
            .query_row(&sql, [id.to_string()], read_row)
            .optional()?;
        row.ok_or_else(|| StoreError::NotFound {
            key: id.to_string(),
        })?
    }

    pub fn get_by_name(&self, name: &str) -> Result<VmRecord, StoreError> {
        let conn = self.lock();
        let sql = format!("SELECT id, {COLUMNS} FROM vms WHERE name = ?1");
        let row = conn.query_row(&sql, [name], read_row).optional()?;
        row.ok_or_else(|| StoreError::NotFound {
            key: name.to_owned(),
        })?
    }

    /// By id if `key` is one, else by name (what `vireo vm show KEY` accepts).
    pub fn find(&self, key: &str) -> Result<VmRecord, StoreError> {
        if let Ok(id) = Uuid::parse_str(key) {
            match self.get_by_id(id) {
                Err(StoreError::NotFound { .. }) => {}
                found => return found,
            }
        }
        self.get_by_name(key).map_err(|e| match e {
            StoreError::NotFound { .. } => StoreError::NotFound {
                key: key.to_owned(),
            },
            e => e,
        })
    }

    /// All VMs, by name.
    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!("SELECT id, {COLUMNS} FROM vms ORDER BY name"))?;
        let rows = stmt.query_map([], read_row)?;
        rows.map(|r| r?).collect()
    }

    /// Replaces the spec (a changed name is a rename). NICs and disks keep the MACs and serials
    /// they carry; new ones without get fresh ones. Whether the change may apply to a running VM
    /// is the daemon's decision, not the store's.
    pub fn update_spec(&self, id: Uuid, spec: &VmSpec) -> Result<VmRecord, StoreError> {
        validate_spec(spec, &self.limits)?;
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let old = load(&tx, id)?;
        tx.execute("DELETE FROM nic_macs WHERE vm_id = ?1", [id.to_string()])?;
        let mut spec = spec.clone();
        let identity = assign_identity(&tx, id, &mut spec)?;
        let now = now_ms();
        let updated = tx.execute(
            "UPDATE vms SET name = ?2, spec = ?3, identity = ?4, updated_at = ?5 WHERE id = ?1",
            params![
                id.to_string(),
                spec.name,
                to_json(&spec),
                to_json(&identity),
                now
            ],
        );
        updated.map_err(|e| name_clash(e, &spec.name))?;
        insert_macs(&tx, id, &identity.macs)?;
        tx.commit()?;
        Ok(VmRecord {
            spec,
            identity,
            updated_at: now,
            ..old
        })
    }

    pub fn rename(&self, id: Uuid, new_name: &str) -> Result<VmRecord, StoreError> {
        validate_vm_name("name", new_name)?;
        let mut spec = self.get_by_id(id)?.spec;
        spec.name = new_name.to_owned();
        self.update_spec(id, &spec)
    }

    /// Applies `action` through the lifecycle (`vireo_api::transition`); an illegal one changes
    /// nothing and reports the current state.
    pub fn set_state(&self, id: Uuid, action: &Action) -> Result<VmRecord, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let old = load(&tx, id)?;
        let state = transition(&old.state, action)?;
        let now = now_ms();
        tx.execute(
            "UPDATE vms SET state = ?2, state_reason = ?3, updated_at = ?4 WHERE id = ?1",
            params![id.to_string(), state.name(), state.reason(), now],
        )?;
        tx.commit()?;
        Ok(VmRecord {
            state,
            updated_at: now,
            ..old
        })
    }

    /// Removes the VM and its folder (the disks it names elsewhere are the caller's business).
    pub fn remove(&self, id: Uuid) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute("DELETE FROM vms WHERE id = ?1", [id.to_string()])?;
        if n == 0 {
            return Err(StoreError::NotFound {
                key: id.to_string(),
            });
        }
        tx.commit()?;
        folders::remove_vm_dir(&self.vms_dir, id);
        Ok(())
    }
}

/// Creates `path` owner-only if missing, and makes it owner-only if it exists.
fn private_file(path: &Path) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io(path))?;
    Ok(file)
}

/// Gives every NIC without a MAC a fresh one unused on this host, refuses a given MAC another
/// VM has, and fills in disk serials.
pub(crate) fn assign_identity(
    tx: &Transaction,
    id: Uuid,
    spec: &mut VmSpec,
) -> Result<VmIdentity, StoreError> {
    for i in 0..spec.nics.len() {
        match spec.nics[i].mac {
            Some(mac) if mac_in_use(tx, mac)? => return Err(StoreError::MacTaken { mac }),
            Some(_) => {}
            None => loop {
                let mac = random_mac();
                if !mac_in_use(tx, mac)? && !spec.nics.iter().any(|n| n.mac == Some(mac)) {
                    spec.nics[i].mac = Some(mac);
                    break;
                }
            },
        }
    }
    Ok(VmIdentity::assign(id, spec, || {
        unreachable!("every NIC has its MAC by now")
    }))
}

/// 40 random bits from the OS RNG (a v4 UUID's first five bytes are all random).
fn random_mac() -> MacAddr {
    let b = *Uuid::new_v4().as_bytes();
    MacAddr::generate([b[0], b[1], b[2], b[3], b[4]])
}

fn mac_in_use(tx: &Transaction, mac: MacAddr) -> Result<bool, StoreError> {
    let sql = "SELECT 1 FROM nic_macs WHERE mac = ?1";
    Ok(tx
        .query_row(sql, [mac.to_string()], |_| Ok(()))
        .optional()?
        .is_some())
}

pub(crate) fn insert_macs(tx: &Transaction, id: Uuid, macs: &[MacAddr]) -> Result<(), StoreError> {
    for mac in macs {
        let r = tx.execute(
            "INSERT INTO nic_macs (mac, vm_id) VALUES (?1, ?2)",
            params![mac.to_string(), id.to_string()],
        );
        r.map_err(|e| {
            if is_unique(&e, "nic_macs.mac") {
                StoreError::MacTaken { mac: *mac }
            } else {
                e.into()
            }
        })?;
    }
    Ok(())
}

fn is_unique(e: &rusqlite::Error, column: &str) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, Some(msg))
        if f.code == rusqlite::ErrorCode::ConstraintViolation && msg.contains(column))
}

pub(crate) fn name_clash(e: rusqlite::Error, name: &str) -> StoreError {
    if is_unique(&e, "vms.name") {
        StoreError::NameTaken {
            name: name.to_owned(),
        }
    } else {
        e.into()
    }
}

pub(crate) fn load(tx: &Transaction, id: Uuid) -> Result<VmRecord, StoreError> {
    let sql = format!("SELECT id, {COLUMNS} FROM vms WHERE id = ?1");
    let row = tx.query_row(&sql, [id.to_string()], read_row).optional()?;
    row.ok_or_else(|| StoreError::NotFound {
        key: id.to_string(),
    })?
}

/// A row → record; bad JSON or an unknown state is `Corrupt`, not a panic.
fn read_row(r: &Row) -> rusqlite::Result<Result<VmRecord, StoreError>> {
    let id: String = r.get(0)?;
    let (spec, identity, state): (String, String, String) = (r.get(1)?, r.get(2)?, r.get(3)?);
    let reason: Option<String> = r.get(4)?;
    let (created_at, updated_at) = (r.get(5)?, r.get(6)?);
    let corrupt = |detail: String| StoreError::Corrupt {
        id: id.clone(),
        detail,
    };
    Ok((|| {
        let spec = serde_json::from_str(&spec).map_err(|e| corrupt(format!("spec: {e}")))?;
        let identity =
            serde_json::from_str(&identity).map_err(|e| corrupt(format!("identity: {e}")))?;
        let state = VmState::from_parts(&state, reason)
            .ok_or_else(|| corrupt(format!("state {state:?}")))?;
        Ok(VmRecord {
            spec,
            identity,
            state,
            created_at,
            updated_at,
        })
    })())
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("API types serialize infallibly")
}

pub(crate) fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    since.as_millis() as i64
}
