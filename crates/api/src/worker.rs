//! The control protocol between vireod and a VM's worker process (`vireo-vm`).
//!
//! Transport: the worker listens on `<vm-dir>/worker.sock` (0600). One JSON object per line
//! each way; a connection carries any number of request/response pairs, strictly in turn.
//! Every request carries `version` ([`WORKER_PROTOCOL_VERSION`]); a worker answers a version
//! it does not speak with `Error`, so a vireod and a worker from different builds fail loudly
//! instead of misreading each other.
//!
//! The worker's files in its VM folder (written by whom):
//! - `worker.json` (vireod, after spawning): [`WorkerRecord`], how a restarted vireod finds
//!   and verifies the process.
//! - `spec.json` (vireod, before spawning): the [`WorkerLaunch`] the worker builds the VM from.
//! - `worker.sock`, `console.sock` (the worker): control and console sockets.
//! - `control.sock` (the worker): the text disk-control protocol of `vireo run --control`
//!   (list disks, live merge, online resize), for `vireo control <vm-dir>/control.sock`.
//! - `exit.json` (the worker, last thing before a normal exit): [`WorkerExit`]. A worker
//!   that is gone without one for its pid was killed (or crashed).
//! - `worker.log` (the worker's stderr).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::spec::VmSpec;

pub const WORKER_PROTOCOL_VERSION: u32 = 1;

/// What the worker is started with (`<vm-dir>/spec.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerLaunch {
    pub vm_id: Uuid,
    /// Normalized: every disk has its serial, every NIC its MAC.
    pub spec: VmSpec,
}

/// vireod's record of a worker it spawned (`<vm-dir>/worker.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerRecord {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot): a pid reused by another process
    /// after the worker died has a different start time.
    pub start_time_ticks: u64,
    pub vm_id: Uuid,
}

/// (No `deny_unknown_fields`: serde does not support it beside `flatten`; the `op` enum
/// still refuses an unknown operation.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRequest {
    pub version: u32,
    #[serde(flatten)]
    pub op: WorkerOp,
}

impl WorkerRequest {
    pub fn new(op: WorkerOp) -> Self {
        WorkerRequest {
            version: WORKER_PROTOCOL_VERSION,
            op,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WorkerOp {
    /// Who are you: answered with `Hello`.
    Hello,
    /// Answered with `Status`.
    Status,
    /// Ask the guest to power off: writes the spec's `shutdown_line` to COM1 (`Ok`, or `Error`
    /// when the spec has none). The worker exits once the guest powers off.
    Shutdown,
    /// Stop the vCPUs now, flush the disks, exit (`Ok`, then the worker exits).
    TurnOff,
    /// The last `max_bytes` (at most the ring's size) of COM1 output: `ConsoleLog`.
    ConsoleLog { max_bytes: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum WorkerReply {
    Hello {
        version: u32,
        vm_id: Uuid,
        pid: u32,
    },
    Status(WorkerStatus),
    Ok,
    ConsoleLog {
        /// Base64 (standard alphabet, padded) of the bytes, oldest first.
        data_base64: String,
        /// Bytes the guest has written since the worker started (the ring keeps the last ones).
        total_bytes: u64,
    },
    Error {
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerStatus {
    /// The vCPUs have been started.
    pub running: bool,
    /// Unix time (ms) the vCPUs started.
    pub started_at: Option<i64>,
    /// The console socket clients attach to.
    pub console_socket: PathBuf,
}

/// `<vm-dir>/exit.json`: why the worker ended, written just before it exits on its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerExit {
    pub pid: u32,
    pub reason: WorkerExitReason,
    /// Unix time, milliseconds.
    pub at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkerExitReason {
    /// The guest wrote `status` to the power-off port.
    PoweredOff { status: u8 },
    /// The guest reset the machine (the VM stops; a restart is vireod's decision).
    Reset,
    /// `TurnOff` or SIGTERM/SIGINT: vCPUs stopped, disks flushed.
    TurnedOff,
    /// The VM could not be built (bad disk, KVM failure): nothing ran.
    StartFailed { message: String },
    /// A vCPU failed (triple fault, KVM internal error).
    VcpuFailed { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shapes() {
        let r = WorkerRequest::new(WorkerOp::ConsoleLog { max_bytes: 10 });
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line, r#"{"version":1,"op":"console_log","max_bytes":10}"#);
        assert_eq!(serde_json::from_str::<WorkerRequest>(&line).unwrap(), r);
        let hello = serde_json::to_string(&WorkerRequest::new(WorkerOp::Hello)).unwrap();
        assert_eq!(hello, r#"{"version":1,"op":"hello"}"#);
        let bad = serde_json::from_str::<WorkerRequest>(r#"{"version":1,"op":"reboot"}"#);
        assert!(bad.is_err());
        let exit = WorkerExitReason::PoweredOff { status: 3 };
        assert_eq!(
            serde_json::to_string(&exit).unwrap(),
            r#"{"kind":"powered_off","status":3}"#
        );
        let reply = serde_json::to_string(&WorkerReply::Ok).unwrap();
        assert_eq!(reply, r#"{"reply":"ok"}"#);
    }
}
