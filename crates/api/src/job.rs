//! Jobs: the handle a long operation (start, stop, save, export, checkpoint, merge, migrate)
//! returns at once, to poll, list and cancel. A job ends exactly once: completed, failed (with
//! the error) or cancelled.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Start,
    Stop,
    Save,
    Export,
    Import,
    Clone,
    Checkpoint,
    Merge,
    Migrate,
    /// Storage live migration (`POST /v1/vms/{vm}/move-storage`).
    MoveStorage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Completed,
    Failed,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub id: Uuid,
    /// The VM it acts on; `None` once that VM is removed.
    pub vm_id: Option<Uuid>,
    pub kind: JobKind,
    pub state: JobState,
    /// 0–100.
    pub progress: u8,
    /// Why it failed (state `failed`).
    pub error: Option<String>,
    /// Unix time, milliseconds.
    pub created_at: i64,
    /// A `migrate` job's progress (rounds, dirty rate, remaining, estimated and measured
    /// downtime); live only, while the vireod that runs it serves the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::worker::MigrateProgress>,
}
