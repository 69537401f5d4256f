//! `vireo pool metrics POOL [--output json]`: the pool's metering report
//! (`GET /v1/pools/{pool}/metrics`), in the style of `vireo vm metrics`: the sums first, then
//! one row per VM with its share.

use vireo_api::PoolMetrics;

use crate::api_client::Client;
use crate::disk::human;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};
use crate::table::{render, utc};

pub fn execute(client: &Client, path: &str, output: OutputFormat) -> Result<(), CliError> {
    let m: PoolMetrics = client.get(&format!("{path}/metrics"))?;
    match output {
        OutputFormat::Json => emit(crate::vm::view::json(&m)),
        OutputFormat::Text => emit(text(&m)),
    }
}

fn text(m: &PoolMetrics) -> String {
    let d = &m.disk;
    let mut out = format!(
        "pool:       {} ({} VMs, {} metered)\nperiod:     {}\nmetered:    {:.1} s (summed over the VMs)\ncpu:        {:.1}% of one CPU (vCPUs {:.1}%)\nmemory:     avg {}  min {}  max {} (sums over the VMs)\ndisks:      {} disks: read {}, written {}, {} IOs of 8K, {:.1} IOPS, throttled {:.3} s, {} min-IOPS alerts\nnetwork:    in {}, out {}\n",
        m.pool,
        m.vms,
        m.enabled_vms,
        // 0: no member has a metering period yet.
        if m.period_started_at == 0 {
            "none yet (vireo vm metrics VM --enable starts one)".to_string()
        } else {
            format!("since {} (the earliest VM's)", utc(m.period_started_at))
        },
        m.metered_ms as f64 / 1000.0,
        m.cpu.average_percent,
        m.cpu.vcpu_average_percent,
        human(m.memory.average_bytes),
        human(m.memory.min_bytes),
        human(m.memory.max_bytes),
        d.disks,
        human(d.read_bytes),
        human(d.write_bytes),
        d.normalized_ios,
        d.average_iops,
        d.throttled_ns as f64 / 1e9,
        d.min_iops_alerts,
        human(m.network.bytes_in),
        human(m.network.bytes_out),
    );
    if !m.members.is_empty() {
        let rows: Vec<Vec<String>> = m
            .members
            .iter()
            .map(|v| {
                let vm = &v.metrics;
                let sum = |f: fn(&vireo_api::DiskUsage) -> u64| vm.disks.iter().map(f).sum::<u64>();
                vec![
                    v.name.clone(),
                    if vm.enabled { "enabled" } else { "disabled" }.to_string(),
                    format!("{:.1}", vm.metered_ms as f64 / 1000.0),
                    format!("{:.1}", vm.cpu.average_percent),
                    human(vm.memory.average_bytes),
                    sum(|d| d.read_bytes).to_string(),
                    sum(|d| d.write_bytes).to_string(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&render(
            &[
                "VM",
                "METERING",
                "METERED_S",
                "CPU_%",
                "MEM_AVG",
                "READ_BYTES",
                "WRITTEN_BYTES",
            ],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;
    use vireo_api::{CpuUsage, DiskUsage, MemoryUsage, PoolMemberMetrics, VmMetrics};

    fn vm(enabled: bool, written: u64) -> VmMetrics {
        VmMetrics {
            enabled,
            period_started_at: if enabled { 1_796_398_971_000 } else { 0 },
            sampled_at: None,
            metered_ms: 10_000,
            cpu: CpuUsage {
                average_percent: 25.0,
                vcpu_average_percent: 20.0,
                worker_cpu_ns: 0,
                vcpu_cpu_ns: 0,
            },
            memory: MemoryUsage {
                average_bytes: 1 << 20,
                min_bytes: 1 << 20,
                max_bytes: 1 << 20,
                samples: 1,
            },
            disks: vec![DiskUsage {
                path: "/d".into(),
                read_bytes: 0,
                write_bytes: written,
                read_ops: 0,
                write_ops: 0,
                flush_ops: 0,
                normalized_ios: 1,
                average_iops: 0.1,
                throttled_ns: 0,
                min_iops_alerts: 0,
            }],
            nics: Vec::new(),
        }
    }

    #[test]
    fn text_has_the_sums_and_a_row_per_vm() {
        let members = [("web", vm(true, 4096)), ("db", vm(false, 512))]
            .into_iter()
            .map(|(n, metrics)| PoolMemberMetrics {
                id: Uuid::nil(),
                name: n.into(),
                metrics,
            })
            .collect();
        let t = text(&PoolMetrics::aggregate("p", members));
        assert!(t.starts_with("pool:       p (2 VMs, 1 metered)\n"), "{t}");
        assert!(t.contains("since 2026-12-04 15:42:51 UTC"), "{t}");
        assert!(t.contains("metered:    20.0 s"), "{t}");
        assert!(
            t.contains("cpu:        50.0% of one CPU (vCPUs 40.0%)"),
            "{t}"
        );
        assert!(t.contains("memory:     avg 2 MiB"), "{t}");
        assert!(t.contains("2 disks: read 0 B, written 4.50 KiB"), "{t}");
        assert!(t.contains("\nweb  enabled   10.0"), "{t}");
        assert!(t.contains("db   disabled  10.0"), "{t}");
        let empty = text(&PoolMetrics::aggregate("e", Vec::new()));
        assert!(empty.contains("period:     none yet"), "{empty}");
        assert!(!empty.contains("METERING"), "{empty}");
    }
}
