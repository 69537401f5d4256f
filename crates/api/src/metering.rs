//! Resource metering as the API reports it (`GET /vms/{vm}/metrics`, Hyper-V's Measure-VM):
//! what a VM used during the current metering period, i.e. since metering was last reset,
//! counting only time it ran with metering enabled. vireod builds it from the worker's
//! counters (`worker::WorkerMetrics`), adding them up across worker runs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmMetrics {
    /// Metering counts while enabled (`POST /vms/{vm}/metrics/enable`); new VMs start disabled.
    pub enabled: bool,
    /// Unix time (ms) the period began: the last reset, or the first enable.
    pub period_started_at: i64,
    /// Unix time (ms) of the last worker reading counted, if any.
    pub sampled_at: Option<i64>,
    /// Time the VM ran while metered, milliseconds (the wall time the averages divide by).
    pub metered_ms: u64,
    pub cpu: CpuUsage,
    pub memory: MemoryUsage,
    /// Per disk path, in the order first seen.
    pub disks: Vec<DiskUsage>,
    /// Per NIC (read from the NIC's switch port).
    pub nics: Vec<NicUsage>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuUsage {
    /// Average use of the whole worker process (vCPUs included), percent of one host CPU.
    pub average_percent: f64,
    /// Average use of the vCPU threads alone, percent of one host CPU.
    pub vcpu_average_percent: f64,
    /// CPU time of the worker process in the period, nanoseconds.
    pub worker_cpu_ns: u64,
    /// CPU time of the vCPU threads in the period, nanoseconds.
    pub vcpu_cpu_ns: u64,
}

/// Resident guest memory (host RAM actually backing guest RAM), over the period's samples.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryUsage {
    pub average_bytes: u64,
    pub min_bytes: u64,
    pub max_bytes: u64,
    pub samples: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskUsage {
    pub path: PathBuf,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub flush_ops: u64,
    /// IOs normalized to 8 KiB, as `max_iops`/`min_iops` count them.
    pub normalized_ios: u64,
    /// `normalized_ios` per second of metered time.
    pub average_iops: f64,
    /// Time requests were held back by `max_iops`, nanoseconds.
    pub throttled_ns: u64,
    /// "Minimum IOPS not met" episodes begun in the period.
    pub min_iops_alerts: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicUsage {
    /// The NIC's name in the VM (`nic0`).
    pub name: String,
    /// Bytes and frames the VM received (delivered by the switch to its port).
    pub bytes_in: u64,
    /// Bytes and frames the VM sent into the switch.
    pub bytes_out: u64,
    #[serde(default)]
    pub packets_in: u64,
    #[serde(default)]
    pub packets_out: u64,
    /// Frames of the VM's the switch dropped (any reason).
    #[serde(default)]
    pub dropped: u64,
    /// Per ACL rule with action `meter` (or any rule): what matched it, e.g. traffic to one
    /// remote address range (Hyper-V's metered port ACLs).
    #[serde(default)]
    pub acl: std::collections::BTreeMap<String, crate::switch::AclMeter>,
}
