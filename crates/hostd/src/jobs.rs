//! Jobs in the store (table `jobs`): created running, moved by progress, ended once. Same
//! locking as `store.rs` (one IMMEDIATE transaction per change).
//!
//! Recovery rule: a job still `running` when the store opens belonged to a vireod that died; its
//! work stopped with it, so `open` marks it failed ("vireod restarted") rather than leave a
//! client polling forever.

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use uuid::Uuid;
use vireo_api::{Job, JobKind, JobState};

use crate::error::StoreError;
use crate::store::{now_ms, Store};

const COLUMNS: &str = "id, vm_id, kind, state, progress, error, created_at";

impl Store {
    pub fn create_job(&self, vm_id: Option<Uuid>, kind: JobKind) -> Result<Job, StoreError> {
        let job = Job {
            id: Uuid::new_v4(),
            vm_id,
            kind,
            state: JobState::Running,
            progress: 0,
            error: None,
            created_at: now_ms(),
            migration: None,
        };
        let conn = self.lock();
        let r = conn.execute(
            "INSERT INTO jobs (id, vm_id, kind, state, progress, error, created_at)
             VALUES (?1, ?2, ?3, 'running', 0, NULL, ?4)",
            params![
                job.id.to_string(),
                vm_id.map(|v| v.to_string()),
                name(&kind),
                job.created_at
            ],
        );
        match r {
            Err(e) if is_fk(&e) => Err(StoreError::NotFound {
                key: vm_id.unwrap_or_default().to_string(),
            }),
            r => r.map(|_| job).map_err(Into::into),
        }
    }

    pub fn get_job(&self, id: Uuid) -> Result<Job, StoreError> {
        get(&self.lock(), id)
    }

    /// All jobs, newest first; only `vm_id`'s if given.
    pub fn list_jobs(&self, vm_id: Option<Uuid>) -> Result<Vec<Job>, StoreError> {
        let conn = self.lock();
        let sql = format!(
            "SELECT {COLUMNS} FROM jobs WHERE ?1 IS NULL OR vm_id = ?1 ORDER BY created_at DESC, id"
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map([vm_id.map(|v| v.to_string())], read)?;
        rows.map(|r| r?).collect()
    }

    /// Progress of a running job (clamped to 100); a finished job is refused.
    pub fn set_job_progress(&self, id: Uuid, progress: u8) -> Result<Job, StoreError> {
        self.end_or_move(id, JobState::Running, progress.min(100), None)
    }

    /// Ends a running job: `Ok` → completed (100 %), `Err(reason)` → failed.
    pub fn finish_job(&self, id: Uuid, outcome: Result<(), String>) -> Result<Job, StoreError> {
        match outcome {
            Ok(()) => self.end_or_move(id, JobState::Completed, 100, None),
            Err(reason) => self.end_or_move(id, JobState::Failed, u8::MAX, Some(reason)),
        }
    }

    pub fn cancel_job(&self, id: Uuid) -> Result<Job, StoreError> {
        self.end_or_move(id, JobState::Cancelled, u8::MAX, None)
    }

    /// `progress == u8::MAX`: keep the current progress.
    fn end_or_move(
        &self,
        id: Uuid,
        state: JobState,
        progress: u8,
        error: Option<String>,
    ) -> Result<Job, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut job = get(&tx, id)?;
        if job.state != JobState::Running {
            return Err(StoreError::JobEnded {
                id,
                state: job.state,
            });
        }
        if progress != u8::MAX {
            job.progress = progress;
        }
        (job.state, job.error) = (state, error);
        tx.execute(
            "UPDATE jobs SET state = ?2, progress = ?3, error = ?4 WHERE id = ?1",
            params![id.to_string(), name(&job.state), job.progress, job.error],
        )?;
        tx.commit()?;
        Ok(job)
    }
}

/// At open: jobs of a previous vireod process can no longer progress.
pub(crate) fn fail_orphaned_jobs(conn: &Connection) -> Result<usize, StoreError> {
    let n = conn.execute(
        "UPDATE jobs SET state = 'failed', error = 'vireod restarted while the job ran' WHERE state = 'running'",
        [],
    )?;
    if n > 0 {
        tracing::warn!(count = n, "jobs of the previous vireod marked failed");
    }
    Ok(n)
}

fn get(conn: &Connection, id: Uuid) -> Result<Job, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1");
    let row = conn.query_row(&sql, [id.to_string()], read).optional()?;
    row.ok_or_else(|| StoreError::NotFound {
        key: id.to_string(),
    })?
}

/// The serde name of a unit enum variant (`JobKind::Start` → `start`): one spelling for JSON
/// and the table.
fn name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => unreachable!("job kinds and states are unit variants"),
    }
}

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

fn read(r: &Row) -> rusqlite::Result<Result<Job, StoreError>> {
    let id: String = r.get(0)?;
    let vm_id: Option<String> = r.get(1)?;
    let (kind, state): (String, String) = (r.get(2)?, r.get(3)?);
    let (progress, error, created_at): (i64, Option<String>, i64) =
        (r.get(4)?, r.get(5)?, r.get(6)?);
    let corrupt = |detail: String| StoreError::Corrupt {
        id: id.clone(),
        detail,
    };
    Ok((|| {
        Ok(Job {
            id: Uuid::parse_str(&id).map_err(|e| corrupt(format!("job id: {e}")))?,
            vm_id: vm_id
                .map(|v| Uuid::parse_str(&v))
                .transpose()
                .map_err(|e| corrupt(format!("vm_id: {e}")))?,
            kind: parse(&kind).ok_or_else(|| corrupt(format!("job kind {kind:?}")))?,
            state: parse(&state).ok_or_else(|| corrupt(format!("job state {state:?}")))?,
            progress: u8::try_from(progress)
                .map_err(|_| corrupt(format!("progress {progress}")))?,
            error,
            created_at,
            migration: None,
        })
    })())
}

fn is_fk(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY)
}
