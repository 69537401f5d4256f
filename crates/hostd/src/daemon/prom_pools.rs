//! The per-pool series of `/metrics` (label `pool` = name), each the sum over the pool's
//! members of the per-VM series of the same scrape (the same last worker readings, members
//! with a worker only): `vireo_pool_vms` (members), `vireo_pool_cpu_seconds_total`,
//! `vireo_pool_vcpu_seconds_total`, `vireo_pool_memory_resident_bytes`,
//! `vireo_pool_disk_{read,written}_bytes_total`, `vireo_pool_disk_{read,write}_ops_total`.
//! Like the VM counters they may go down (a member's worker restarts or a member leaves);
//! Prometheus reads that as a counter reset.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use uuid::Uuid;
use vireo_api::worker::WorkerMetrics;
use vireo_api::{Pool, Vm};

type Labels = Vec<(String, String)>;

/// Sums of one pool's members' readings.
#[derive(Default)]
struct Sums {
    cpu_ns: u64,
    vcpu_ns: u64,
    resident: u64,
    read_bytes: u64,
    written_bytes: u64,
    read_ops: u64,
    write_ops: u64,
}

fn sums(pool: &Pool, vms: &[Vm], readings: &HashMap<Uuid, WorkerMetrics>) -> Sums {
    let mut s = Sums::default();
    for member in &pool.vms {
        let has_worker = vms
            .iter()
            .any(|v| v.id() == member.id && v.state.has_worker());
        let Some(m) = readings.get(&member.id).filter(|_| has_worker) else {
            continue;
        };
        s.cpu_ns = s.cpu_ns.saturating_add(m.worker_cpu_ns);
        s.vcpu_ns = s.vcpu_ns.saturating_add(m.vcpu_cpu_ns);
        s.resident = s.resident.saturating_add(m.memory_resident_bytes);
        for d in &m.disks {
            s.read_bytes = s.read_bytes.saturating_add(d.read_bytes);
            s.written_bytes = s.written_bytes.saturating_add(d.write_bytes);
            s.read_ops = s.read_ops.saturating_add(d.read_ops);
            s.write_ops = s.write_ops.saturating_add(d.write_ops);
        }
    }
    s
}

/// Registers the pool families in `reg` and fills them.
pub fn register(
    reg: &mut Registry,
    pools: &[Pool],
    vms: &[Vm],
    readings: &HashMap<Uuid, WorkerMetrics>,
) {
    let members = Family::<Labels, Gauge>::default();
    reg.register("vireo_pool_vms", "VMs in the pool", members.clone());
    let seconds = |name: &str, help: &str, reg: &mut Registry| {
        let f = Family::<Labels, Counter<f64, AtomicU64>>::default();
        reg.register(name, help, f.clone());
        f
    };
    let cpu = seconds(
        "vireo_pool_cpu_seconds",
        "CPU time of the members' worker processes (sum of vireo_vm_cpu_seconds_total)",
        reg,
    );
    let vcpu = seconds(
        "vireo_pool_vcpu_seconds",
        "CPU time of the members' vCPU threads (sum of vireo_vm_vcpu_seconds_total)",
        reg,
    );
    let mem = Family::<Labels, Gauge>::default();
    reg.register(
        "vireo_pool_memory_resident_bytes",
        "Guest RAM the host holds for the members",
        mem.clone(),
    );
    let counter = |name: &str, help: &str, reg: &mut Registry| {
        let f = Family::<Labels, Counter>::default();
        reg.register(name, help, f.clone());
        f
    };
    let read_bytes = counter(
        "vireo_pool_disk_read_bytes",
        "Bytes read by the members' guests, all disks",
        reg,
    );
    let written_bytes = counter(
        "vireo_pool_disk_written_bytes",
        "Bytes written by the members' guests, all disks",
        reg,
    );
    let read_ops = counter(
        "vireo_pool_disk_read_ops",
        "Read requests completed, all members' disks",
        reg,
    );
    let write_ops = counter(
        "vireo_pool_disk_write_ops",
        "Write requests completed, all members' disks",
        reg,
    );
    for pool in pools {
        let l: Labels = vec![("pool".to_owned(), pool.name.clone())];
        let s = sums(pool, vms, readings);
        members.get_or_create(&l).set(pool.vms.len() as i64);
        cpu.get_or_create(&l).inc_by(s.cpu_ns as f64 / 1e9);
        vcpu.get_or_create(&l).inc_by(s.vcpu_ns as f64 / 1e9);
        mem.get_or_create(&l)
            .set(i64::try_from(s.resident).unwrap_or(i64::MAX));
        read_bytes.get_or_create(&l).inc_by(s.read_bytes);
        written_bytes.get_or_create(&l).inc_by(s.written_bytes);
        read_ops.get_or_create(&l).inc_by(s.read_ops);
        write_ops.get_or_create(&l).inc_by(s.write_ops);
    }
}
