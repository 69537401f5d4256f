//! The metering rows (`vm_metering`, schema step 2): one JSON document per VM, written whole.
//! The document's type is the daemon's business; the store only keeps it.

use rusqlite::{params, OptionalExtension};
use uuid::Uuid;

use crate::error::StoreError;
use crate::store::Store;

impl Store {
    /// The metering document of VM `id`, if one was ever saved.
    pub fn load_metering(&self, id: Uuid) -> Result<Option<String>, StoreError> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                "SELECT state FROM vm_metering WHERE vm_id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Saves it (a VM removed meanwhile: nothing is saved, and that is no error).
    pub fn save_metering(&self, id: Uuid, state: &str, now_ms: i64) -> Result<(), StoreError> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO vm_metering (vm_id, state, updated_at)
             SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM vms WHERE id = ?1)
             ON CONFLICT(vm_id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
            params![id.to_string(), state, now_ms],
        )?;
        Ok(())
    }
}
