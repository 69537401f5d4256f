//! Resource metering (Hyper-V's Measure-VM), the arithmetic: a VM's `MeterState` takes worker
//! readings (`WorkerMetrics`, counters since that worker started) and adds the growth since the
//! previous reading to the period's totals while metering is enabled. The last reading is kept
//! with the worker's pid, so the totals carry on across a vireod restart (the next reading of
//! the same worker counts from the persisted one) and across worker runs (a new pid, or
//! counters that went down, count from zero). Pure data: the sampler and the routes do the I/O.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vireo_api::worker::WorkerMetrics;
use vireo_api::{CpuUsage, DiskUsage, MemoryUsage, VmMetrics};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MeterState {
    pub enabled: bool,
    pub period_started_at: i64,
    pub totals: Totals,
    /// The last reading seen (counted or not), and whose it was.
    pub last: Option<Reading>,
    /// The NICs, read from their switch ports.
    #[serde(default)]
    pub nics: super::switches::nic_meter::NicMeters,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub pid: u32,
    pub at: i64,
    pub metrics: WorkerMetrics,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub sampled_at: Option<i64>,
    pub uptime_ns: u64,
    pub vcpu_cpu_ns: u64,
    pub worker_cpu_ns: u64,
    pub mem_samples: u64,
    pub mem_sum: u128,
    pub mem_min: u64,
    pub mem_max: u64,
    pub disks: Vec<DiskTotals>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskTotals {
    pub path: PathBuf,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub flush_ops: u64,
    pub normalized_ios: u64,
    pub throttled_ns: u64,
    pub min_iops_alerts: u64,
}

/// Growth of a counter: a counter that went down belongs to a new run and counts from zero.
fn grow(now: u64, before: u64) -> u64 {
    if now >= before {
        now - before
    } else {
        now
    }
}

impl MeterState {
    /// Takes worker `pid`'s reading `m` made at `at` (Unix ms).
    pub fn record(&mut self, pid: u32, at: i64, m: WorkerMetrics) {
        if self.enabled {
            let same_run = self
                .last
                .as_ref()
                .filter(|l| l.pid == pid && m.uptime_ns >= l.metrics.uptime_ns);
            let zero = WorkerMetrics {
                uptime_ns: 0,
                vcpu_cpu_ns: 0,
                worker_cpu_ns: 0,
                memory_bytes: 0,
                memory_resident_bytes: 0,
                worker_private_bytes: 0,
                disks: Vec::new(),
            };
            let before = same_run.map_or(&zero, |l| &l.metrics);
            self.totals.add(before, &m, at);
        }
        self.last = Some(Reading {
            pid,
            at,
            metrics: m,
        });
    }

    pub fn enable(&mut self, now: i64) {
        if !self.enabled && self.totals == Totals::default() {
            self.period_started_at = now;
        }
        self.enabled = true;
    }

    pub fn disable(&mut self) {
        self.enabled = false;
    }

    /// Ends the period: returns its report and starts a new one now (the last reading stays
    /// the baseline, so nothing is counted twice).
    pub fn reset(&mut self, now: i64) -> VmMetrics {
        let report = self.report();
        self.totals = Totals::default();
        self.nics.reset();
        self.period_started_at = now;
        report
    }

    pub fn report(&self) -> VmMetrics {
        let t = &self.totals;
        let wall_ns = t.uptime_ns;
        let percent = |ns: u64| {
            if wall_ns == 0 {
                0.0
            } else {
                ns as f64 * 100.0 / wall_ns as f64
            }
        };
        VmMetrics {
            enabled: self.enabled,
            period_started_at: self.period_started_at,
            sampled_at: t.sampled_at,
            metered_ms: wall_ns / 1_000_000,
            cpu: CpuUsage {
                average_percent: percent(t.worker_cpu_ns),
                vcpu_average_percent: percent(t.vcpu_cpu_ns),
                worker_cpu_ns: t.worker_cpu_ns,
                vcpu_cpu_ns: t.vcpu_cpu_ns,
            },
            memory: MemoryUsage {
                average_bytes: t.mem_sum.checked_div(t.mem_samples.into()).unwrap_or(0) as u64,
                min_bytes: t.mem_min,
                max_bytes: t.mem_max,
                samples: t.mem_samples,
            },
            disks: t
                .disks
                .iter()
                .map(|d| DiskUsage {
                    path: d.path.clone(),
                    read_bytes: d.read_bytes,
                    write_bytes: d.write_bytes,
                    read_ops: d.read_ops,
                    write_ops: d.write_ops,
                    flush_ops: d.flush_ops,
                    normalized_ios: d.normalized_ios,
                    average_iops: if wall_ns == 0 {
                        0.0
                    } else {
                        d.normalized_ios as f64 * 1e9 / wall_ns as f64
                    },
                    throttled_ns: d.throttled_ns,
                    min_iops_alerts: d.min_iops_alerts,
                })
                .collect(),
            nics: self.nics.report(),
        }
    }
}

impl Totals {
    fn add(&mut self, before: &WorkerMetrics, now: &WorkerMetrics, at: i64) {
        self.sampled_at = Some(at);
        self.uptime_ns += grow(now.uptime_ns, before.uptime_ns);
        self.vcpu_cpu_ns += grow(now.vcpu_cpu_ns, before.vcpu_cpu_ns);
        self.worker_cpu_ns += grow(now.worker_cpu_ns, before.worker_cpu_ns);
        let mem = now.memory_resident_bytes;
        self.mem_min = if self.mem_samples == 0 {
            mem
        } else {
            self.mem_min.min(mem)
        };
        self.mem_max = self.mem_max.max(mem);
        self.mem_samples += 1;
        self.mem_sum += u128::from(mem);
        for d in &now.disks {
            let prev = before.disks.iter().find(|b| b.path == d.path);
            let g = |f: fn(&vireo_api::worker::DiskMetrics) -> u64| grow(f(d), prev.map_or(0, f));
            let t = match self.disks.iter_mut().position(|t| t.path == d.path) {
                Some(i) => &mut self.disks[i],
                None => {
                    self.disks.push(DiskTotals {
                        path: d.path.clone(),
                        ..DiskTotals::default()
                    });
                    self.disks.last_mut().expect("just pushed")
                }
            };
            t.read_bytes += g(|x| x.read_bytes);
            t.write_bytes += g(|x| x.write_bytes);
            t.read_ops += g(|x| x.read_ops);
            t.write_ops += g(|x| x.write_ops);
            t.flush_ops += g(|x| x.flush_ops);
            t.normalized_ios += g(|x| x.normalized_ios);
            t.throttled_ns += g(|x| x.throttled_ns);
            t.min_iops_alerts += g(|x| x.min_iops_alerts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_api::worker::DiskMetrics;

    fn reading(uptime_s: u64, cpu_s: u64, mem: u64, written: u64) -> WorkerMetrics {
        WorkerMetrics {
            uptime_ns: uptime_s * 1_000_000_000,
            vcpu_cpu_ns: cpu_s * 500_000_000,
            worker_cpu_ns: cpu_s * 1_000_000_000,
            memory_bytes: 1 << 30,
            memory_resident_bytes: mem,
            worker_private_bytes: 0,
            disks: vec![DiskMetrics {
                path: "/d.vhdx".into(),
                serial: None,
                read_bytes: 0,
                write_bytes: written,
                read_ops: 0,
                write_ops: written / 512,
                flush_ops: 0,
                normalized_ios: written / 512,
                throttled_ns: 0,
                min_iops_alerts: 0,
                min_iops_alert_active: false,
            }],
        }
    }

    #[test]
    fn counts_growth_only_while_enabled_and_across_runs() {
        let mut m = MeterState::default();
        m.record(1, 0, reading(10, 1, 100, 512));
        m.enable(5);
        assert_eq!(m.period_started_at, 5);
        // Only what grew after the enable counts.
        m.record(1, 1, reading(20, 6, 300, 2048));
        let r = m.report();
        assert_eq!(r.metered_ms, 10_000);
        assert_eq!(r.cpu.worker_cpu_ns, 5_000_000_000);
        assert!((r.cpu.average_percent - 50.0).abs() < 1e-9);
        assert_eq!(r.disks[0].write_bytes, 1536);
        assert!((r.disks[0].average_iops - 0.3).abs() < 1e-9);
        // A new worker (pid 2) counts from zero and adds on.
        m.record(2, 2, reading(4, 1, 100, 1024));
        let r = m.report();
        assert_eq!(r.disks[0].write_bytes, 2560);
        assert_eq!(r.metered_ms, 14_000);
        assert_eq!((r.memory.min_bytes, r.memory.max_bytes), (100, 300));
        assert_eq!(r.memory.average_bytes, 200);
        // Disabled: the baseline moves, nothing counts.
        m.disable();
        m.record(2, 3, reading(8, 2, 100, 4096));
        assert_eq!(m.report().disks[0].write_bytes, 2560);
        m.enable(4);
        assert_eq!(m.period_started_at, 5, "re-enabling keeps the period");
        m.record(2, 5, reading(9, 2, 100, 4608));
        let last = m.reset(6);
        assert_eq!(last.disks[0].write_bytes, 3072);
        let r = m.report();
        assert_eq!((r.period_started_at, r.metered_ms), (6, 0));
        assert!(r.disks.is_empty());
        // After the reset only the growth past the last reading counts.
        m.record(2, 7, reading(10, 2, 100, 5120));
        assert_eq!(m.report().disks[0].write_bytes, 512);
    }
}
