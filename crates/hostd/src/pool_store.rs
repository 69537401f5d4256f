//! Resource pools in the store (`pools`, `pool_members`, schema step 3): create, find, list,
//! delete, and membership. Every change is one IMMEDIATE transaction under the store's lock,
//! like the VM rows, so a pool deleted while a VM joins it either takes the member along or
//! refuses — never leaves a member row pointing nowhere (the foreign keys also forbid it).
//! A VM is in at most one pool: the member row's key is the VM.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use uuid::Uuid;
use vireo_api::{validate_name, Pool, PoolMember};

use crate::error::StoreError;
use crate::store::{now_ms, Store};

impl Store {
    pub fn create_pool(&self, name: &str) -> Result<Pool, StoreError> {
        validate_name("name", name)?;
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = Uuid::new_v4();
        let now = now_ms();
        let r = tx.execute(
            "INSERT INTO pools (id, name, created_at) VALUES (?1, ?2, ?3)",
            params![id.to_string(), name, now],
        );
        r.map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, Some(msg))
                if f.code == rusqlite::ErrorCode::ConstraintViolation
                    && msg.contains("pools.name") =>
            {
                StoreError::PoolNameTaken {
                    name: name.to_owned(),
                }
            }
            e => e.into(),
        })?;
        tx.commit()?;
        Ok(Pool {
            id,
            name: name.to_owned(),
            created_at: now,
            vms: Vec::new(),
        })
    }

    /// By id if `key` is one, else by name.
    pub fn find_pool(&self, key: &str) -> Result<Pool, StoreError> {
        let conn = self.lock();
        let id = pool_id(&conn, key)?;
        load_pool(&conn, &id)
    }

    /// All pools, by name.
    pub fn list_pools(&self) -> Result<Vec<Pool>, StoreError> {
        let conn = self.lock();
        let ids: Vec<String> = {
            let mut stmt = conn.prepare("SELECT id FROM pools ORDER BY name")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        ids.iter().map(|id| load_pool(&conn, id)).collect()
    }

    /// The pool VM `vm` is in, if any.
    pub fn pool_of(&self, vm: Uuid) -> Result<Option<Pool>, StoreError> {
        let conn = self.lock();
        let id: Option<String> = conn
            .query_row(
                "SELECT pool_id FROM pool_members WHERE vm_id = ?1",
                [vm.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        id.map(|id| load_pool(&conn, &id)).transpose()
    }

    /// Deletes the pool. One with members is refused unless `force`, which releases them (the
    /// VMs themselves are untouched).
    pub fn delete_pool(&self, key: &str, force: bool) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = pool_id(&tx, key)?;
        let pool = load_pool(&tx, &id)?;
        if !pool.vms.is_empty() && !force {
            return Err(StoreError::PoolNotEmpty {
                name: pool.name,
                members: pool.vms.len(),
            });
        }
        tx.execute("DELETE FROM pools WHERE id = ?1", [&id])?;
        tx.commit()?;
        Ok(())
    }

    /// Puts VM `vm` into pool `key`; already there is no change. A VM in another pool is
    /// refused (leave that one first: a move is never silent).
    pub fn add_to_pool(&self, key: &str, vm: Uuid) -> Result<Pool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = pool_id(&tx, key)?;
        join(&tx, &id, vm)?;
        let pool = load_pool(&tx, &id)?;
        tx.commit()?;
        Ok(pool)
    }

    /// Takes VM `vm` out of pool `key`; a VM not in it is `NotAMember`.
    pub fn remove_from_pool(&self, key: &str, vm: Uuid) -> Result<Pool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = pool_id(&tx, key)?;
        let n = tx.execute(
            "DELETE FROM pool_members WHERE vm_id = ?1 AND pool_id = ?2",
            params![vm.to_string(), id],
        )?;
        let pool = load_pool(&tx, &id)?;
        if n == 0 {
            return Err(StoreError::NotAMember {
                vm: vm_name(&tx, vm)?,
                pool: pool.name,
            });
        }
        tx.commit()?;
        Ok(pool)
    }
}

/// VM `vm` joins pool `pool_key` inside the caller's transaction (create uses it so a VM is
/// created in its pool or not at all).
pub(crate) fn join_by_key(conn: &Connection, pool_key: &str, vm: Uuid) -> Result<(), StoreError> {
    let id = pool_id(conn, pool_key)?;
    join(conn, &id, vm)
}

fn join(conn: &Connection, pool_id: &str, vm: Uuid) -> Result<(), StoreError> {
    let current: Option<String> = conn
        .query_row(
            "SELECT pool_id FROM pool_members WHERE vm_id = ?1",
            [vm.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    match current {
        Some(p) if p == pool_id => Ok(()),
        Some(other) => Err(StoreError::InAnotherPool {
            vm: vm_name(conn, vm)?,
            pool: load_pool(conn, &other)?.name,
        }),
        None => {
            // The VM must exist: a missing one is NotFound, not a foreign-key failure.
            vm_name(conn, vm)?;
            conn.execute(
                "INSERT INTO pool_members (vm_id, pool_id, added_at) VALUES (?1, ?2, ?3)",
                params![vm.to_string(), pool_id, now_ms()],
            )?;
            Ok(())
        }
    }
}

fn pool_id(conn: &Connection, key: &str) -> Result<String, StoreError> {
    let by = |sql: &str, v: &str| -> rusqlite::Result<Option<String>> {
        conn.query_row(sql, [v], |r| r.get(0)).optional()
    };
    if let Ok(id) = Uuid::parse_str(key) {
        if let Some(id) = by("SELECT id FROM pools WHERE id = ?1", &id.to_string())? {
            return Ok(id);
        }
    }
    by("SELECT id FROM pools WHERE name = ?1", key)?.ok_or_else(|| StoreError::PoolNotFound {
        key: key.to_owned(),
    })
}

fn vm_name(conn: &Connection, vm: Uuid) -> Result<String, StoreError> {
    conn.query_row(
        "SELECT name FROM vms WHERE id = ?1",
        [vm.to_string()],
        |r| r.get(0),
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound {
        key: vm.to_string(),
    })
}

fn load_pool(conn: &Connection, id: &str) -> Result<Pool, StoreError> {
    let (name, created_at): (String, i64) = conn
        .query_row(
            "SELECT name, created_at FROM pools WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .ok_or_else(|| StoreError::PoolNotFound { key: id.to_owned() })?;
    let mut stmt = conn.prepare(
        "SELECT vms.id, vms.name FROM pool_members JOIN vms ON vms.id = pool_members.vm_id
         WHERE pool_members.pool_id = ?1 ORDER BY vms.name",
    )?;
    let rows = stmt.query_map([id], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut vms = Vec::new();
    for row in rows {
        let (vm_id, vm_name) = row?;
        let vm_id = Uuid::parse_str(&vm_id).map_err(|e| StoreError::Corrupt {
            id: vm_id.clone(),
            detail: format!("VM id in pool {name:?}: {e}"),
        })?;
        vms.push(PoolMember {
            id: vm_id,
            name: vm_name,
        });
    }
    let id = Uuid::parse_str(id).map_err(|e| StoreError::Corrupt {
        id: id.to_owned(),
        detail: format!("pool id: {e}"),
    })?;
    Ok(Pool {
        id,
        name,
        created_at,
        vms,
    })
}
