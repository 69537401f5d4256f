//! Resource pools (Hyper-V's resource pools and `Measure-VMResourcePool`): a named group of VMs
//! whose metering is reported together. A VM is in at most one pool. A pool has no counters of
//! its own: its report is the sum of its current members' reports (`VmMetrics`, each for that
//! VM's current metering period), so a VM that leaves takes its usage with it, and resetting a
//! member's metering resets its share. [`PoolMetrics::aggregate`] is the one definition of the
//! sum; `docs/api.md` spells it out field by field.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::metering::VmMetrics;

/// `GET /v1/pools/{pool}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub id: Uuid,
    pub name: String,
    /// Unix time, milliseconds.
    pub created_at: i64,
    /// The members, by name.
    pub vms: Vec<PoolMember>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMember {
    pub id: Uuid,
    pub name: String,
}

/// `POST /v1/pools`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePoolRequest {
    pub name: String,
}

/// `POST /v1/pools/{pool}/vms`: the VM (id or name) to add.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddPoolMemberRequest {
    pub vm: String,
}

/// `GET /v1/pools/{pool}/metrics`: the members' reports and their sum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMetrics {
    pub pool: String,
    /// Members (all of them, metered or not).
    pub vms: u32,
    /// Members whose metering is enabled.
    pub enabled_vms: u32,
    /// The earliest `period_started_at` among members that have a period (non-zero); 0 if none.
    pub period_started_at: i64,
    /// The latest member `sampled_at`; `None` if no member was ever counted.
    pub sampled_at: Option<i64>,
    /// Sum of the members' `metered_ms` (VM-time: two VMs metered 10 s each make 20 000).
    pub metered_ms: u64,
    pub cpu: PoolCpuUsage,
    pub memory: PoolMemoryUsage,
    pub disk: PoolDiskUsage,
    pub network: PoolNetworkUsage,
    /// Each member's report, by VM name: the numbers the sums above are made of.
    pub members: Vec<PoolMemberMetrics>,
}

/// Sums over the members.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolCpuUsage {
    /// Sum of the members' `average_percent`: the pool's load in percent of one host CPU
    /// (exact when the members ran over the same time; Hyper-V sums the same way).
    pub average_percent: f64,
    /// Sum of the members' `vcpu_average_percent`.
    pub vcpu_average_percent: f64,
    pub worker_cpu_ns: u64,
    pub vcpu_cpu_ns: u64,
}

/// Sums over the members of each member's own figure.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMemoryUsage {
    pub average_bytes: u64,
    /// Sum of the members' minimums (a floor of the pool's resident memory).
    pub min_bytes: u64,
    /// Sum of the members' maximums (a ceiling: the members' peaks need not coincide).
    pub max_bytes: u64,
    /// Sum of the members' readings.
    pub samples: u64,
}

/// Sums over every disk of every member.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolDiskUsage {
    /// Distinct (member, disk path) pairs reported.
    pub disks: u32,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub flush_ops: u64,
    pub normalized_ios: u64,
    /// Sum of the disks' `average_iops`.
    pub average_iops: f64,
    pub throttled_ns: u64,
    pub min_iops_alerts: u64,
}

/// Sums over every NIC of every member (zero for now: the worker has no NICs yet).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolNetworkUsage {
    pub bytes_in: u64,
    pub bytes_out: u64,
    #[serde(default)]
    pub packets_in: u64,
    #[serde(default)]
    pub packets_out: u64,
    #[serde(default)]
    pub dropped: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMemberMetrics {
    pub id: Uuid,
    pub name: String,
    pub metrics: VmMetrics,
}

impl PoolMetrics {
    /// The pool's report from its members' reports. Counters saturate rather than wrap.
    pub fn aggregate(pool: &str, members: Vec<PoolMemberMetrics>) -> PoolMetrics {
        let mut cpu = PoolCpuUsage::default();
        let mut memory = PoolMemoryUsage::default();
        let mut disk = PoolDiskUsage::default();
        let mut network = PoolNetworkUsage::default();
        let (mut metered_ms, mut enabled_vms) = (0u64, 0u32);
        let mut period_started_at: Option<i64> = None;
        let mut sampled_at: Option<i64> = None;
        for m in members.iter().map(|m| &m.metrics) {
            enabled_vms += u32::from(m.enabled);
            if m.period_started_at != 0 {
                period_started_at = Some(
                    period_started_at.map_or(m.period_started_at, |p| p.min(m.period_started_at)),
                );
            }
            sampled_at = sampled_at.max(m.sampled_at);
            metered_ms = metered_ms.saturating_add(m.metered_ms);
            cpu.average_percent += m.cpu.average_percent;
            cpu.vcpu_average_percent += m.cpu.vcpu_average_percent;
            cpu.worker_cpu_ns = cpu.worker_cpu_ns.saturating_add(m.cpu.worker_cpu_ns);
            cpu.vcpu_cpu_ns = cpu.vcpu_cpu_ns.saturating_add(m.cpu.vcpu_cpu_ns);
            memory.average_bytes = memory.average_bytes.saturating_add(m.memory.average_bytes);
            memory.min_bytes = memory.min_bytes.saturating_add(m.memory.min_bytes);
            memory.max_bytes = memory.max_bytes.saturating_add(m.memory.max_bytes);
            memory.samples = memory.samples.saturating_add(m.memory.samples);
            for d in &m.disks {
                disk.disks += 1;
                disk.read_bytes = disk.read_bytes.saturating_add(d.read_bytes);
                disk.write_bytes = disk.write_bytes.saturating_add(d.write_bytes);
                disk.read_ops = disk.read_ops.saturating_add(d.read_ops);
                disk.write_ops = disk.write_ops.saturating_add(d.write_ops);
                disk.flush_ops = disk.flush_ops.saturating_add(d.flush_ops);
                disk.normalized_ios = disk.normalized_ios.saturating_add(d.normalized_ios);
                disk.average_iops += d.average_iops;
                disk.throttled_ns = disk.throttled_ns.saturating_add(d.throttled_ns);
                disk.min_iops_alerts = disk.min_iops_alerts.saturating_add(d.min_iops_alerts);
            }
            for n in &m.nics {
                network.bytes_in = network.bytes_in.saturating_add(n.bytes_in);
                network.bytes_out = network.bytes_out.saturating_add(n.bytes_out);
                network.packets_in = network.packets_in.saturating_add(n.packets_in);
                network.packets_out = network.packets_out.saturating_add(n.packets_out);
                network.dropped = network.dropped.saturating_add(n.dropped);
            }
        }
        PoolMetrics {
            pool: pool.to_owned(),
            vms: members.len() as u32,
            enabled_vms,
            period_started_at: period_started_at.unwrap_or(0),
            sampled_at,
            metered_ms,
            cpu,
            memory,
            disk,
            network,
            members,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::{CpuUsage, DiskUsage, MemoryUsage, NicUsage};

    fn report(enabled: bool, start: i64, at: Option<i64>, written: u64, mem: u64) -> VmMetrics {
        VmMetrics {
            enabled,
            period_started_at: start,
            sampled_at: at,
            metered_ms: 10_000,
            cpu: CpuUsage {
                average_percent: 12.5,
                vcpu_average_percent: 10.0,
                worker_cpu_ns: 1_250_000_000,
                vcpu_cpu_ns: 1_000_000_000,
            },
            memory: MemoryUsage {
                average_bytes: mem,
                min_bytes: mem / 2,
                max_bytes: mem * 2,
                samples: 3,
            },
            disks: vec![DiskUsage {
                path: "/d.vhdx".into(),
                read_bytes: 1,
                write_bytes: written,
                read_ops: 1,
                write_ops: written / 512,
                flush_ops: 2,
                normalized_ios: 4,
                average_iops: 0.4,
                throttled_ns: 5,
                min_iops_alerts: 1,
            }],
            nics: vec![NicUsage {
                name: "eth0".into(),
                bytes_in: 7,
                bytes_out: 9,
                packets_in: 1,
                packets_out: 2,
                dropped: 3,
                acl: Default::default(),
            }],
        }
    }

    fn member(name: &str, metrics: VmMetrics) -> PoolMemberMetrics {
        PoolMemberMetrics {
            id: Uuid::new_v4(),
            name: name.into(),
            metrics,
        }
    }

    #[test]
    fn every_field_is_the_documented_sum() {
        let p = PoolMetrics::aggregate(
            "p",
            vec![
                member("a", report(true, 500, Some(900), 4096, 1000)),
                member("b", report(false, 300, Some(700), 512, 3000)),
                member("never", report(false, 0, None, 0, 0)),
            ],
        );
        assert_eq!((p.vms, p.enabled_vms), (3, 1));
        assert_eq!(p.period_started_at, 300, "earliest non-zero start");
        assert_eq!(p.sampled_at, Some(900));
        assert_eq!(p.metered_ms, 30_000);
        assert_eq!(p.cpu.worker_cpu_ns, 3_750_000_000);
        assert!((p.cpu.average_percent - 37.5).abs() < 1e-9);
        assert_eq!(
            p.memory,
            PoolMemoryUsage {
                average_bytes: 4000,
                min_bytes: 2000,
                max_bytes: 8000,
                samples: 9
            }
        );
        assert_eq!(p.disk.disks, 3);
        assert_eq!(p.disk.write_bytes, 4096 + 512);
        assert_eq!(p.disk.write_ops, 9);
        assert_eq!(p.disk.min_iops_alerts, 3);
        assert!((p.disk.average_iops - 1.2).abs() < 1e-9);
        assert_eq!((p.network.bytes_in, p.network.bytes_out), (21, 27));
        assert_eq!(
            (
                p.network.packets_in,
                p.network.packets_out,
                p.network.dropped
            ),
            (3, 6, 9)
        );
        assert_eq!(p.members.len(), 3);
    }

    #[test]
    fn an_empty_pool_reports_zeros_and_no_period() {
        let p = PoolMetrics::aggregate("empty", Vec::new());
        assert_eq!((p.vms, p.period_started_at, p.sampled_at), (0, 0, None));
        assert_eq!(p.disk, PoolDiskUsage::default());
        let json = serde_json::to_value(&p).unwrap();
        let back: PoolMetrics = serde_json::from_value(json).unwrap();
        assert_eq!(back, p);
    }
}
