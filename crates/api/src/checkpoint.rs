//! Checkpoints (Hyper-V standard checkpoints, docs/checkpoints.md): the resource, its tree and
//! the request bodies of `/v1/vms/{vm}/checkpoints`. A checkpoint freezes each VHDX disk's
//! file of the moment (the VM goes on in a new differencing child), keeps the VM's spec of the
//! moment and, when the VM was running, paused or saved, its state and memory.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::spec::VmSpec;

/// One disk as a checkpoint froze it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointDisk {
    /// The disk's serial in the spec (how a disk is named across checkpoints).
    pub serial: String,
    /// The file that holds the disk's content at the checkpoint; never written again while
    /// the checkpoint exists (the VM writes a differencing child of it).
    pub frozen: PathBuf,
    /// The file `frozen` is a differencing child of, when it is one.
    #[serde(default)]
    pub parent_file: Option<PathBuf>,
}

/// `GET /v1/vms/{vm}/checkpoints/{cp}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub id: Uuid,
    pub vm_id: Uuid,
    /// Unique among the VM's checkpoints.
    pub name: String,
    /// The checkpoint this one was taken after (the tree's edge); `None` for a root.
    pub parent: Option<Uuid>,
    /// Unix time, milliseconds.
    pub created_at: i64,
    /// The VM's spec when the checkpoint was taken (apply restores it).
    pub spec: VmSpec,
    pub disks: Vec<CheckpointDisk>,
    /// The VM's state and memory were captured (it was running, paused or saved): applying
    /// the checkpoint leaves the VM `saved`, and a start continues from that moment.
    pub has_state: bool,
    /// The VM runs from this checkpoint now ("now" hangs below it in the tree).
    #[serde(default)]
    pub current: bool,
    /// Taken by vireod before a risky operation (the VM's `auto_checkpoint` setting); the
    /// newest `keep` of these are kept, older ones are deleted automatically.
    #[serde(default)]
    pub automatic: bool,
    /// How a running or paused VM's state was captured (absent for an off or saved VM, and
    /// for checkpoints taken before this was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CheckpointCapture>,
}

/// `Checkpoint::capture`: what the guest saw of the checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointCapture {
    /// Taken by the VM's own worker while it ran on (the live capture); `false`: by a save
    /// and a restore (a new worker).
    pub live: bool,
    /// The pause the guest saw, microseconds.
    pub pause_us: u64,
    /// The whole capture, milliseconds.
    pub total_ms: u64,
}

/// `POST /v1/vms/{vm}/checkpoints` (the body is optional).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCheckpointRequest {
    /// Default: `<vm name>-YYYYMMDD-HHMMSS` (UTC), like Hyper-V's `<vm> - <date time>`.
    #[serde(default)]
    pub name: Option<String>,
}

/// `PATCH /v1/vms/{vm}/checkpoints/{cp}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateCheckpointRequest {
    pub name: String,
}

/// `POST /v1/vms/{vm}/checkpoints/{cp}/apply` (the body is optional).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyCheckpointRequest {
    /// A running or paused VM is checkpointed first (its state is kept as a new checkpoint),
    /// then the checkpoint is applied.
    #[serde(default)]
    pub save_current: bool,
    /// A running or paused VM is turned off first (its current state is lost).
    #[serde(default)]
    pub stop: bool,
    /// A running or paused VM is reverted in its own worker, which keeps running (QEMU's
    /// `loadvm`): its disks go onto new children of the checkpoint's files and its memory and
    /// device state become the checkpoint's in one pause. Needs a checkpoint with state whose
    /// spec has the VM's memory, vCPUs, disks and NICs, and no switch NIC; otherwise 409
    /// (nothing changed). Not together with `save_current` or `stop`.
    #[serde(default)]
    pub keep_running: bool,
}

/// The tree in display order: each checkpoint with its depth, children after their parent
/// (oldest first); `now` is placed below the current checkpoint. Pure, for the CLI and tests.
pub fn tree_order(cps: &[Checkpoint]) -> Vec<(usize, &Checkpoint)> {
    let mut out = Vec::with_capacity(cps.len());
    let known: std::collections::HashSet<Uuid> = cps.iter().map(|c| c.id).collect();
    let mut roots: Vec<&Checkpoint> = cps
        .iter()
        .filter(|c| c.parent.is_none_or(|p| !known.contains(&p)))
        .collect();
    roots.sort_by_key(|c| (c.created_at, c.id));
    // Depth-first with an explicit stack; a bound on the work guards against a cycle in
    // damaged data.
    let mut stack: Vec<(usize, &Checkpoint)> = roots.into_iter().rev().map(|c| (0, c)).collect();
    while let Some((depth, c)) = stack.pop() {
        if out.len() >= cps.len() {
            break;
        }
        out.push((depth, c));
        let mut kids: Vec<&Checkpoint> = cps.iter().filter(|k| k.parent == Some(c.id)).collect();
        kids.sort_by_key(|k| (k.created_at, k.id));
        stack.extend(kids.into_iter().rev().map(|k| (depth + 1, k)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(n: u128, parent: Option<u128>, at: i64) -> Checkpoint {
        Checkpoint {
            id: Uuid::from_u128(n),
            vm_id: Uuid::from_u128(99),
            name: format!("c{n}"),
            parent: parent.map(Uuid::from_u128),
            created_at: at,
            spec: serde_json::from_str(
                r#"{"version":1,"name":"a","vcpus":1,"memory_bytes":33554432,"kernel":"/k"}"#,
            )
            .unwrap(),
            disks: vec![],
            has_state: false,
            current: false,
            automatic: false,
            capture: None,
        }
    }

    #[test]
    fn tree_puts_children_under_parents_oldest_first() {
        let cps = vec![
            cp(3, Some(1), 30),
            cp(1, None, 10),
            cp(2, Some(1), 20),
            cp(4, Some(2), 40),
        ];
        let order: Vec<(usize, u128)> = tree_order(&cps)
            .into_iter()
            .map(|(d, c)| (d, c.id.as_u128()))
            .collect();
        assert_eq!(order, vec![(0, 1), (1, 2), (2, 4), (1, 3)]);
    }

    #[test]
    fn a_cycle_in_damaged_data_does_not_loop() {
        let cps = vec![cp(1, Some(2), 1), cp(2, Some(1), 2)];
        assert!(tree_order(&cps).len() <= 2);
    }
}
