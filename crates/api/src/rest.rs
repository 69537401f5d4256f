//! Bodies of the REST routes that are not a resource of their own (`docs/api.md`): the host
//! summary and the small request bodies of `rename` and `stop`.

use serde::{Deserialize, Serialize};

/// `GET /v1/host`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    /// vireod's version (the crate version).
    pub version: String,
    /// VMs in the inventory.
    pub vms: u32,
    /// VMs in state `running`.
    pub running: u32,
    pub max_vcpus: u32,
    pub max_memory_bytes: u64,
}

/// `POST /v1/vms/{vm}/rename`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    pub name: String,
}

/// `POST /v1/vms/{vm}/stop` (the body is optional).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds the guest gets to power off before the VM is turned off; default
    /// [`DEFAULT_STOP_TIMEOUT_SECS`], at most [`MAX_STOP_TIMEOUT_SECS`].
    #[serde(default)]
    pub timeout_secs: Option<u32>,
}

pub const DEFAULT_STOP_TIMEOUT_SECS: u32 = 30;
pub const MAX_STOP_TIMEOUT_SECS: u32 = 3600;

/// `POST /v1/vms/{vm}/disks/{disk}/resize`: the disk's new virtual size. A running or paused
/// VM's disk is resized online (the guest is told); a VM that is off has its file resized.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeDiskRequest {
    pub size_bytes: u64,
    /// Shrink even over data (that data is lost); only while the VM is off.
    #[serde(default)]
    pub force: bool,
}

/// The answer to [`ResizeDiskRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeDiskReply {
    /// The disk's index in the VM's spec.
    pub index: usize,
    pub serial: Option<String>,
    pub size_bytes: u64,
    /// The automatic checkpoint taken before the resize (the VM's `auto_checkpoint` setting).
    #[serde(default)]
    pub automatic_checkpoint: Option<String>,
}
