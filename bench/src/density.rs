//! `vireo-bench density`: many probe VMs under one vireod on this small host. Starts `--vms`
//! VMs concurrently through the API, waits until every one is `running` and its guest printed
//! `PROBE READY`, then fires `--requests` API calls (list, show, host) from `--clients`
//! concurrent connections while they run, and measures vireod's RSS and each worker's private
//! memory outside guest RAM (USS: code pages shared between workers do not count).
//!
//! Last line: `vms=<n> all_ready_s=<n> api_p99_ms=<n> worker_uss_kib=<n> vireod_rss_kib=<n>`
//! (worker_uss_kib is the mean over the workers). Targets (issue 15): all READY, p99 < 100 ms,
//! worker USS ≤ 1024 KiB.

mod client;
mod daemon;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::json;
use vireo_probe_image::{kvm_usable, probe_elf};

use crate::boot::smaps::{self, GuestRamRule};
use client::Client;
use daemon::Daemon;

#[derive(clap::Args)]
pub struct DensityArgs {
    /// VMs to start at once.
    #[arg(long, default_value_t = 50)]
    vms: u32,
    /// Guest RAM of each VM, MiB.
    #[arg(long, default_value_t = 32)]
    memory_mib: u32,
    /// API requests of the load phase.
    #[arg(long, default_value_t = 1000)]
    requests: u32,
    /// Concurrent API clients of the load phase.
    #[arg(long, default_value_t = 20)]
    clients: u32,
    /// Give up when not every VM is ready within this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout_secs: u64,
    /// The vireod binary (default: beside this executable).
    #[arg(long)]
    vireod: Option<PathBuf>,
    /// The worker binary (default: vireo-vm beside this executable).
    #[arg(long)]
    worker: Option<PathBuf>,
}

const POLL: Duration = Duration::from_millis(100);

pub fn run(args: DensityArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !kvm_usable() {
        return Err("density needs /dev/kvm".into());
    }
    if args.vms == 0 || args.clients == 0 || args.requests < args.clients {
        return Err("--vms and --clients must be at least 1, --requests at least --clients".into());
    }
    let vireod = daemon::locate(args.vireod.clone(), "vireod")?;
    let worker = daemon::locate(args.worker.clone(), "vireo-vm")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let daemon = Daemon::start(&vireod, &worker)?;
    let result = rt.block_on(measure(&args, &daemon));
    if result.is_err() {
        eprintln!("vireod log: {}", daemon.log_tail());
    }
    drop(daemon);
    let report = result?;
    report.print(&args);
    Ok(())
}

struct Report {
    ready_s: Vec<f64>,
    api_ms: Vec<f64>,
    worker_uss_kib: Vec<u64>,
    vireod_rss_kib: u64,
    turn_off_s: f64,
}

fn name(i: u32) -> String {
    format!("density-{i:03}")
}

async fn measure(args: &DensityArgs, daemon: &Daemon) -> Result<Report, String> {
    let socket = daemon.socket.clone();
    let mut admin = Client::connect(&socket).await?;
    for i in 0..args.vms {
        let spec = json!({
            "version": 1,
            "name": name(i),
            "vcpus": 1,
            "memory_bytes": u64::from(args.memory_mib) << 20,
            "kernel": probe_elf(),
            "console_ring_bytes": 4096,
            "shutdown_line": "POWEROFF",
        });
        admin
            .expect(Method::POST, "/v1/vms", Some(&spec), StatusCode::CREATED)
            .await?;
    }

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut boots = Vec::new();
    for i in 0..args.vms {
        let socket = socket.clone();
        boots.push(tokio::spawn(async move {
            start_until_ready(&socket, &name(i), started, deadline).await
        }));
    }
    let mut ready_s = Vec::new();
    for b in boots {
        ready_s.push(b.await.map_err(|e| format!("start task: {e}"))??);
    }

    let per_client = args.requests / args.clients;
    let mut loads = Vec::new();
    for c in 0..args.clients {
        let socket = socket.clone();
        let vms = args.vms;
        loads.push(tokio::spawn(async move {
            load(&socket, c, per_client, vms).await
        }));
    }
    let mut api_ms = Vec::new();
    for l in loads {
        api_ms.extend(l.await.map_err(|e| format!("load task: {e}"))??);
    }

    let vireod_rss_kib = vm_rss_kib(daemon.pid())?;
    let rule = GuestRamRule::PathSuffix(crate::boot::launch::VIREO_RAM_SUFFIX.into());
    let mut worker_uss_kib = Vec::new();
    for pid in daemon.worker_pids() {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
            .map_err(|e| format!("worker {pid} smaps: {e}"))?;
        let maps = smaps::parse(&text).map_err(|e| e.to_string())?;
        worker_uss_kib.push(smaps::private_overhead_kib(&maps, &rule).map_err(|e| e.to_string())?);
    }
    if worker_uss_kib.len() != args.vms as usize {
        return Err(format!(
            "{} workers recorded for {} VMs",
            worker_uss_kib.len(),
            args.vms
        ));
    }

    let off = Instant::now();
    let mut offs = Vec::new();
    for i in 0..args.vms {
        let socket = socket.clone();
        offs.push(tokio::spawn(async move {
            let mut c = Client::connect(&socket).await?;
            let path = format!("/v1/vms/{}/turn-off", name(i));
            let a = c.expect(Method::POST, &path, None, StatusCode::OK).await?;
            match a.json()?.get("state").and_then(|s| s.as_str()) {
                Some("off") => Ok(()),
                other => Err(format!("{path}: state {other:?} after turn-off")),
            }
        }));
    }
    for o in offs {
        o.await.map_err(|e| format!("turn-off task: {e}"))??;
    }
    Ok(Report {
        ready_s,
        api_ms,
        worker_uss_kib,
        vireod_rss_kib,
        turn_off_s: off.elapsed().as_secs_f64(),
    })
}

/// Starts one VM and returns the seconds from `t0` until it is `running` and its console log
/// holds `PROBE READY`.
async fn start_until_ready(
    socket: &std::path::Path,
    vm: &str,
    t0: Instant,
    deadline: Instant,
) -> Result<f64, String> {
    let mut c = Client::connect(socket).await?;
    let job = c
        .expect(
            Method::POST,
            &format!("/v1/vms/{vm}/start"),
            None,
            StatusCode::ACCEPTED,
        )
        .await?
        .json()?;
    let job_id = job["id"].as_str().unwrap_or_default().to_string();
    loop {
        if Instant::now() > deadline {
            return Err(format!("{vm}: not ready before the deadline"));
        }
        let vm_now = c
            .expect(Method::GET, &format!("/v1/vms/{vm}"), None, StatusCode::OK)
            .await?
            .json()?;
        match vm_now["state"].as_str() {
            Some("running") => {
                let log = c
                    .expect(
                        Method::GET,
                        &format!("/v1/vms/{vm}/console/log"),
                        None,
                        StatusCode::OK,
                    )
                    .await?;
                if String::from_utf8_lossy(&log.body).contains("PROBE READY") {
                    return Ok(t0.elapsed().as_secs_f64());
                }
            }
            Some("starting") => {}
            other => {
                let j = c
                    .call(Method::GET, &format!("/v1/jobs/{job_id}"), None)
                    .await?
                    .text();
                return Err(format!("{vm}: state {other:?} while starting; job {j}"));
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `n` requests on one connection, cycling list / show / host; returns their latencies (ms).
async fn load(socket: &std::path::Path, client: u32, n: u32, vms: u32) -> Result<Vec<f64>, String> {
    let mut c = Client::connect(socket).await?;
    let mut took = Vec::with_capacity(n as usize);
    for k in 0..n {
        let path = match k % 3 {
            0 => "/v1/vms".to_string(),
            1 => format!("/v1/vms/{}", name((client * 7 + k) % vms)),
            _ => "/v1/host".to_string(),
        };
        let a = c.expect(Method::GET, &path, None, StatusCode::OK).await?;
        took.push(a.took.as_secs_f64() * 1000.0);
    }
    Ok(took)
}

fn vm_rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("vireod status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS in vireod's status".into())
}

/// Nearest-rank percentile of an unsorted series.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

impl Report {
    fn print(&self, args: &DensityArgs) {
        let all_ready = self.ready_s.iter().copied().fold(0.0, f64::max);
        let uss_mean =
            self.worker_uss_kib.iter().sum::<u64>() / self.worker_uss_kib.len().max(1) as u64;
        let uss_max = self.worker_uss_kib.iter().copied().max().unwrap_or(0);
        println!(
            "{} probe VMs of {} MiB started concurrently through vireod's API",
            args.vms, args.memory_mib
        );
        println!(
            "  ready (running + PROBE READY): first {:.2} s, median {:.2} s, all {:.2} s",
            self.ready_s.iter().copied().fold(f64::INFINITY, f64::min),
            percentile(&self.ready_s, 50.0),
            all_ready
        );
        println!(
            "  API under load ({} requests, {} clients; list/show/host): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.api_ms.len(),
            args.clients,
            percentile(&self.api_ms, 50.0),
            percentile(&self.api_ms, 99.0),
            percentile(&self.api_ms, 100.0)
        );
        println!(
            "  worker private memory outside guest RAM: mean {uss_mean} KiB, max {uss_max} KiB"
        );
        println!("  vireod RSS: {} KiB", self.vireod_rss_kib);
        println!(
            "  turn-off of all {} VMs: {:.2} s",
            args.vms, self.turn_off_s
        );
        println!(
            "vms={} all_ready_s={:.2} api_p99_ms={:.2} worker_uss_kib={} vireod_rss_kib={}",
            self.ready_s.len(),
            all_ready,
            percentile(&self.api_ms, 99.0),
            uss_mean,
            self.vireod_rss_kib
        );
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
