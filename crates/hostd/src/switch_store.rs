//! Switches in the inventory (schema step 3): each switch's `SwitchSpec` under a unique name,
//! and the host interfaces added to it as ports. VM NIC ports are not rows: they follow from the
//! VMs' specs (`NicSpec.switch`), so removing a switch checks those specs in the same
//! transaction and refuses while any VM still has a NIC on it.

use rusqlite::{params, OptionalExtension, TransactionBehavior};
use uuid::Uuid;
use vireo_api::switch::SwitchSpec;
use vireo_api::{validate_name, ApiError, ApiErrorCode, SpecError, VmSpec};
use vireo_netconfig::PortConfig;

use crate::store::now_ms;
use crate::{Store, StoreError};

/// A stored switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchRow {
    pub id: Uuid,
    pub spec: SwitchSpec,
    pub created_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum SwitchStoreError {
    #[error("a switch named {0:?} already exists; choose another name")]
    NameTaken(String),
    #[error("no switch {0:?} (neither a switch id nor a switch name)")]
    NotFound(String),
    #[error("switch {name:?} has NICs of VM(s) {vms}; remove those NICs (vireo vm nic rm) first")]
    InUse { name: String, vms: String },
    #[error("switch {switch:?} already has a port {port:?}")]
    PortTaken { switch: String, port: String },
    #[error("switch {switch:?} has no interface port {port:?}")]
    PortNotFound { switch: String, port: String },
    #[error(transparent)]
    Invalid(#[from] SpecError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for SwitchStoreError {
    fn from(e: rusqlite::Error) -> Self {
        SwitchStoreError::Store(e.into())
    }
}

impl From<&SwitchStoreError> for ApiError {
    fn from(e: &SwitchStoreError) -> Self {
        let code = match e {
            SwitchStoreError::NameTaken(_)
            | SwitchStoreError::InUse { .. }
            | SwitchStoreError::PortTaken { .. } => ApiErrorCode::Conflict,
            SwitchStoreError::NotFound(_) | SwitchStoreError::PortNotFound { .. } => {
                ApiErrorCode::NotFound
            }
            SwitchStoreError::Invalid(_) => ApiErrorCode::Invalid,
            SwitchStoreError::Store(s) => return ApiError::from(s),
        };
        ApiError::new(code, e.to_string())
    }
}

fn is_unique(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

fn corrupt(id: &str, what: &str, e: serde_json::Error) -> SwitchStoreError {
    SwitchStoreError::Store(StoreError::Corrupt {
        id: id.to_owned(),
        detail: format!("{what}: {e}"),
    })
}

fn read_switch(id: String, spec: String, created_at: i64) -> Result<SwitchRow, SwitchStoreError> {
    let spec = serde_json::from_str(&spec).map_err(|e| corrupt(&id, "switch spec", e))?;
    let uuid = Uuid::parse_str(&id).map_err(|_| {
        SwitchStoreError::Store(StoreError::Corrupt {
            id: id.clone(),
            detail: "switch id".into(),
        })
    })?;
    Ok(SwitchRow {
        id: uuid,
        spec,
        created_at,
    })
}

impl Store {
    /// Stores a new switch (name validated like a VM's, unique among switches).
    pub fn create_switch(&self, spec: &SwitchSpec) -> Result<SwitchRow, SwitchStoreError> {
        validate_name("name", &spec.name)?;
        let conn = self.lock();
        let id = Uuid::new_v4();
        let now = now_ms();
        let text = serde_json::to_string(spec).expect("switch specs serialize");
        let r = conn.execute(
            "INSERT INTO switches (id, name, spec, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![id.to_string(), spec.name, text, now],
        );
        match r {
            Ok(_) => Ok(SwitchRow {
                id,
                spec: spec.clone(),
                created_at: now,
            }),
            Err(e) if is_unique(&e) => Err(SwitchStoreError::NameTaken(spec.name.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// All switches, by name.
    pub fn list_switches(&self) -> Result<Vec<SwitchRow>, SwitchStoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT id, spec, created_at FROM switches ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, spec, at) = row?;
            out.push(read_switch(id, spec, at)?);
        }
        Ok(out)
    }

    /// By id if `key` is one, else by name.
    pub fn find_switch(&self, key: &str) -> Result<SwitchRow, SwitchStoreError> {
        let conn = self.lock();
        let row: Option<(String, String, i64)> = conn
            .query_row(
                "SELECT id, spec, created_at FROM switches WHERE id = ?1 OR name = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let (id, spec, at) = row.ok_or_else(|| SwitchStoreError::NotFound(key.to_owned()))?;
        read_switch(id, spec, at)
    }

    /// Removes the switch and its interface ports, unless a VM has a NIC on it (checked in the
    /// same transaction, so a NIC added concurrently cannot be left on a removed switch).
    pub fn remove_switch(&self, id: Uuid) -> Result<(), SwitchStoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let name: String = tx
            .query_row(
                "SELECT name FROM switches WHERE id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| SwitchStoreError::NotFound(id.to_string()))?;
        let mut users = Vec::new();
        {
            let mut stmt = tx.prepare("SELECT name, spec FROM vms ORDER BY name")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
            for row in rows {
                let (vm, spec): (String, String) = row?;
                let spec: VmSpec =
                    serde_json::from_str(&spec).map_err(|e| corrupt(&vm, "spec", e))?;
                if spec.nics.iter().any(|n| n.switch == name) {
                    users.push(vm);
                }
            }
        }
        if !users.is_empty() {
            return Err(SwitchStoreError::InUse {
                name,
                vms: users.join(", "),
            });
        }
        tx.execute("DELETE FROM switches WHERE id = ?1", [id.to_string()])?;
        tx.commit()?;
        Ok(())
    }

    /// The interface ports of a switch, by name.
    pub fn interface_ports(&self, switch: Uuid) -> Result<Vec<PortConfig>, SwitchStoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT name, config FROM switch_ports WHERE switch_id = ?1 ORDER BY name")?;
        let rows = stmt.query_map([switch.to_string()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, text) = row?;
            out.push(serde_json::from_str(&text).map_err(|e| corrupt(&name, "port", e))?);
        }
        Ok(out)
    }

    pub fn add_interface_port(
        &self,
        switch: &SwitchRow,
        config: &PortConfig,
    ) -> Result<(), SwitchStoreError> {
        let conn = self.lock();
        let text = serde_json::to_string(config).expect("port configs serialize");
        let r = conn.execute(
            "INSERT INTO switch_ports (switch_id, name, config) VALUES (?1, ?2, ?3)",
            params![switch.id.to_string(), config.name, text],
        );
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_unique(&e) => Err(SwitchStoreError::PortTaken {
                switch: switch.spec.name.clone(),
                port: config.name.clone(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces the stored policy of interface port `config.name`.
    pub fn set_interface_port(
        &self,
        switch: &SwitchRow,
        config: &PortConfig,
    ) -> Result<(), SwitchStoreError> {
        let conn = self.lock();
        let text = serde_json::to_string(config).expect("port configs serialize");
        let n = conn.execute(
            "UPDATE switch_ports SET config = ?3 WHERE switch_id = ?1 AND name = ?2",
            params![switch.id.to_string(), config.name, text],
        )?;
        if n == 0 {
            return Err(SwitchStoreError::PortNotFound {
                switch: switch.spec.name.clone(),
                port: config.name.clone(),
            });
        }
        Ok(())
    }

    pub fn remove_interface_port(
        &self,
        switch: &SwitchRow,
        name: &str,
    ) -> Result<(), SwitchStoreError> {
        let conn = self.lock();
        let n = conn.execute(
            "DELETE FROM switch_ports WHERE switch_id = ?1 AND name = ?2",
            params![switch.id.to_string(), name],
        )?;
        if n == 0 {
            return Err(SwitchStoreError::PortNotFound {
                switch: switch.spec.name.clone(),
                port: name.to_owned(),
            });
        }
        Ok(())
    }

    /// Replaces a switch's stored spec (same name: a switch is not renamed here). Its overlay's
    /// policy entries live in it (`docs/netvirt.md`), so a changed entry is one row update.
    pub fn set_switch_spec(&self, id: Uuid, spec: &SwitchSpec) -> Result<(), SwitchStoreError> {
        let conn = self.lock();
        let text = serde_json::to_string(spec).expect("switch specs serialize");
        let n = conn.execute(
            "UPDATE switches SET spec = ?2 WHERE id = ?1 AND name = ?3",
            params![id.to_string(), text, spec.name],
        )?;
        if n == 0 {
            return Err(SwitchStoreError::NotFound(id.to_string()));
        }
        Ok(())
    }
}
