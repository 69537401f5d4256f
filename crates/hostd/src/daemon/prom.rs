//! `GET /metrics`: Prometheus/OpenMetrics text (prometheus-client), built afresh per scrape
//! from the store, the sampler's last worker readings and the API request counts, so there is
//! no second copy of any number to keep in step.
//!
//! Series: `vireod_up`, `vireo_vms{state}`, `vireod_api_requests_total{route,status}`;
//! per VM (label `vm` = name): `vireo_vm_state{vm,state}` (1 for the current state),
//! `vireo_vm_cpu_seconds_total`, `vireo_vm_vcpu_seconds_total`,
//! `vireo_vm_memory_resident_bytes`, and per disk (label `disk` = path)
//! `vireo_vm_disk_{read,written}_bytes_total`, `vireo_vm_disk_{read,write}_ops_total`, and per
//! NIC (label `nic`) `vireo_vm_nic_{received,sent}_{bytes,packets}_total`,
//! `vireo_vm_nic_dropped_packets_total` (the switch port's counters, since its process started).
//! VM counters are the worker's, since that worker started (they restart at 0 with it, as
//! Prometheus counters may). Per pool: `prom_pools`.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::http_error::HttpError;
use super::routes::St;

type Labels = Vec<(String, String)>;

/// API requests answered, by route template and status.
#[derive(Default)]
pub struct RequestCounts {
    counts: Mutex<HashMap<(String, u16), u64>>,
}

/// Middleware: counts every answered request.
pub async fn count_requests(State(d): St, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let resp = next.run(req).await;
    let mut counts = d.prom.counts.lock().unwrap_or_else(|p| p.into_inner());
    *counts.entry((route, resp.status().as_u16())).or_default() += 1;
    resp
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const STATES: [&str; 9] = [
    "off", "starting", "running", "paused", "stopping", "saving", "saved", "critical", "lost",
];

pub async fn scrape(State(d): St) -> Result<Response, HttpError> {
    let vms = d.store.list()?;
    let readings = d.meters.last_readings();
    let nic_readings = d.meters.last_nic_readings();
    let mut reg = Registry::default();
    let up = Gauge::<i64>::default();
    up.set(1);
    reg.register("vireod_up", "vireod is serving", up);
    let by_state = Family::<Labels, Gauge>::default();
    reg.register("vireo_vms", "VMs by state", by_state.clone());
    let requests = Family::<Labels, Counter>::default();
    reg.register(
        "vireod_api_requests",
        "API requests answered, by route and status",
        requests.clone(),
    );
    let vm_state = Family::<Labels, Gauge>::default();
    reg.register(
        "vireo_vm_state",
        "1 for the VM's current state",
        vm_state.clone(),
    );
    let cpu = Family::<Labels, Counter<f64, AtomicU64>>::default();
    reg.register(
        "vireo_vm_cpu_seconds",
        "CPU time of the VM's worker process since it started",
        cpu.clone(),
    );
    let vcpu = Family::<Labels, Counter<f64, AtomicU64>>::default();
    reg.register(
        "vireo_vm_vcpu_seconds",
        "CPU time of the VM's vCPU threads since the worker started",
        vcpu.clone(),
    );
    let mem = Family::<Labels, Gauge>::default();
    reg.register(
        "vireo_vm_memory_resident_bytes",
        "Guest RAM the host holds for the VM",
        mem.clone(),
    );
    let disk = |name: &str, help: &str, reg: &mut Registry| {
        let f = Family::<Labels, Counter>::default();
        reg.register(name, help, f.clone());
        f
    };
    let read_bytes = disk(
        "vireo_vm_disk_read_bytes",
        "Bytes read by the guest",
        &mut reg,
    );
    let written_bytes = disk(
        "vireo_vm_disk_written_bytes",
        "Bytes written by the guest",
        &mut reg,
    );
    let read_ops = disk(
        "vireo_vm_disk_read_ops",
        "Read requests completed",
        &mut reg,
    );
    let write_ops = disk(
        "vireo_vm_disk_write_ops",
        "Write requests completed",
        &mut reg,
    );

    let nic_received = disk(
        "vireo_vm_nic_received_bytes",
        "Bytes the switch delivered to the VM's NIC (since the switch process started)",
        &mut reg,
    );
    let nic_sent = disk(
        "vireo_vm_nic_sent_bytes",
        "Bytes the VM's NIC sent into the switch (since the switch process started)",
        &mut reg,
    );
    let nic_received_packets = disk(
        "vireo_vm_nic_received_packets",
        "Frames delivered to the VM's NIC",
        &mut reg,
    );
    let nic_sent_packets = disk(
        "vireo_vm_nic_sent_packets",
        "Frames the VM's NIC sent",
        &mut reg,
    );
    let nic_dropped = disk(
        "vireo_vm_nic_dropped_packets",
        "The VM's frames the switch dropped",
        &mut reg,
    );

    for s in STATES {
        let n = vms.iter().filter(|v| v.state.name() == s).count();
        by_state
            .get_or_create(&labels(&[("state", s)]))
            .set(n as i64);
    }
    for ((route, status), n) in d
        .prom
        .counts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        requests
            .get_or_create(&labels(&[
                ("route", route),
                ("status", &status.to_string()),
            ]))
            .inc_by(*n);
    }
    for vm in &vms {
        let name = vm.spec.name.as_str();
        vm_state
            .get_or_create(&labels(&[("vm", name), ("state", vm.state.name())]))
            .set(1);
        for (nic, r) in nic_readings
            .get(&vm.id())
            .into_iter()
            .flatten()
            .filter(|_| vm.state.has_worker())
        {
            let l = labels(&[("vm", name), ("nic", nic)]);
            nic_received.get_or_create(&l).inc_by(r.meters.bytes_out);
            nic_sent.get_or_create(&l).inc_by(r.meters.bytes_in);
            nic_received_packets
                .get_or_create(&l)
                .inc_by(r.meters.packets_out);
            nic_sent_packets
                .get_or_create(&l)
                .inc_by(r.meters.packets_in);
            nic_dropped
                .get_or_create(&l)
                .inc_by(r.meters.drops.values().sum());
        }
        let Some(m) = readings.get(&vm.id()).filter(|_| vm.state.has_worker()) else {
            continue;
        };
        let l = labels(&[("vm", name)]);
        cpu.get_or_create(&l).inc_by(m.worker_cpu_ns as f64 / 1e9);
        vcpu.get_or_create(&l).inc_by(m.vcpu_cpu_ns as f64 / 1e9);
        mem.get_or_create(&l)
            .set(i64::try_from(m.memory_resident_bytes).unwrap_or(i64::MAX));
        for dm in &m.disks {
            let path = dm.path.to_string_lossy();
            let l = labels(&[("vm", name), ("disk", &path)]);
            read_bytes.get_or_create(&l).inc_by(dm.read_bytes);
            written_bytes.get_or_create(&l).inc_by(dm.write_bytes);
            read_ops.get_or_create(&l).inc_by(dm.read_ops);
            write_ops.get_or_create(&l).inc_by(dm.write_ops);
        }
    }
    super::prom_pools::register(&mut reg, &d.store.list_pools()?, &vms, &readings);
    let mut text = String::new();
    encode(&mut text, &reg).map_err(|e| HttpError::internal(format!("encoding /metrics: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
