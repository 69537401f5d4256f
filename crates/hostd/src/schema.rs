//! Schema migrations by `PRAGMA user_version`: step N (1-based) of `MIGRATIONS` takes the schema
//! from version N-1 to N, in one transaction with the version bump, so a crash mid-migration
//! leaves the previous version intact. A database newer than this code is refused, never
//! "downgraded". Append steps; never edit a released one.

use std::path::Path;

use rusqlite::Connection;

use crate::error::StoreError;

pub const MIGRATIONS: &[&str] = &[
    // 1: VMs, their NIC MACs (unique across the host), jobs.
    r#"
    CREATE TABLE vms (
        id           TEXT PRIMARY KEY,
        name         TEXT NOT NULL UNIQUE,
        spec         TEXT NOT NULL,      -- VmSpec JSON, normalized (MACs, serials filled in)
        identity     TEXT NOT NULL,      -- VmIdentity JSON
        state        TEXT NOT NULL,      -- VmState::name()
        state_reason TEXT,               -- for 'critical'
        created_at   INTEGER NOT NULL,   -- Unix ms
        updated_at   INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE nic_macs (
        mac   TEXT PRIMARY KEY,
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE
    ) STRICT;
    CREATE INDEX nic_macs_vm ON nic_macs(vm_id);
    CREATE TABLE jobs (
        id         TEXT PRIMARY KEY,
        vm_id      TEXT REFERENCES vms(id) ON DELETE SET NULL,
        kind       TEXT NOT NULL,
        state      TEXT NOT NULL,
        progress   INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
        error      TEXT,
        created_at INTEGER NOT NULL
    ) STRICT;
    "#,
    // 2: resource metering per VM (enabled, period start, totals across worker runs and the
    // last worker reading counted), one JSON document (`daemon::meter::MeterState`).
    r#"
    CREATE TABLE vm_metering (
        vm_id      TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        state      TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT;
    "#,
    // 3: resource pools; a VM is in at most one (the member row's key is the VM). Removing a
    // VM leaves its pool; removing a pool (forced) releases its members.
    r#"
    CREATE TABLE pools (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE pool_members (
        vm_id    TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        pool_id  TEXT NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        added_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX pool_members_pool ON pool_members(pool_id);
    "#,
    // 4: switches (unique names, the `SwitchSpec` JSON) and the host interfaces added to them
    // as ports (the `PortConfig` JSON; name = the interface), removed with their switch. VM
    // NIC ports are not stored here: they follow from the VMs' specs.
    r#"
    CREATE TABLE switches (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL UNIQUE,
        spec       TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE switch_ports (
        switch_id  TEXT NOT NULL REFERENCES switches(id) ON DELETE CASCADE,
        name       TEXT NOT NULL,
        config     TEXT NOT NULL,
        PRIMARY KEY (switch_id, name)
    ) STRICT;
    "#,
    // 5: checkpoints (docs/checkpoints.md). `checkpoints`: the tree (parent edge), the spec
    // and frozen disk files of the moment. `checkpoint_heads`: per VM, the checkpoint it runs
    // from and the differencing children vireod made for it (`tops`, JSON). `checkpoint_intents`:
    // at most one create/apply/delete in flight per VM, written before its first file is made,
    // so a restarted vireod finishes or rolls it back.
    r#"
    CREATE TABLE checkpoints (
        id         TEXT PRIMARY KEY,
        vm_id      TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        name       TEXT NOT NULL,
        parent     TEXT,
        created_at INTEGER NOT NULL,
        spec       TEXT NOT NULL,
        disks      TEXT NOT NULL,
        has_state  INTEGER NOT NULL,
        UNIQUE (vm_id, name)
    ) STRICT;
    CREATE TABLE checkpoint_heads (
        vm_id   TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        current TEXT,
        tops    TEXT NOT NULL
    ) STRICT;
    CREATE TABLE checkpoint_intents (
        vm_id  TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        intent TEXT NOT NULL,
        phase  TEXT NOT NULL
    ) STRICT;
    "#,
    // 6: automatic checkpoints (docs/checkpoints.md): vireod took it before a risky operation,
    // so its retention may delete it; a user's checkpoint (0) is never deleted automatically.
    r#"
    ALTER TABLE checkpoints ADD COLUMN automatic INTEGER NOT NULL DEFAULT 0;
    "#,
];

/// The schema version this code writes.
pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Brings the database at `path` up to `MIGRATIONS`.
pub fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    apply(conn, path, MIGRATIONS)
}

/// Applies the steps of `steps` the database lacks; public so tests can feed a failing step.
pub fn apply(conn: &mut Connection, path: &Path, steps: &[&str]) -> Result<(), StoreError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let supported = steps.len() as i64;
    if found > supported {
        return Err(StoreError::SchemaTooNew {
            path: path.to_owned(),
            found,
            supported,
        });
    }
    for (i, sql) in steps.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
        tracing::info!(db = %path.display(), version = i + 1, "schema migrated");
    }
    Ok(())
}
