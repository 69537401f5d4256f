//! QEMU's side of the `migrate` benchmark, with the settings the issue names as its best here:
//! multifd with 2 channels, `-incoming defer`, a low `downtime-limit`, no bandwidth cap, over
//! loopback TCP, on the same probe guest and workload.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use vireo_probe_image::qemu::{QemuProbe, QemuProbeConfig};

use super::watch::{gap_ms, Watch, DIRTY_PAGES};
use super::{Case, Sample, MEMORY_MIB, T};
use crate::checkpoint::qmp::Qmp;

/// A QEMU probe, the QMP socket that drives it and a direct reader of its guest's counter.
fn spawn(
    qemu: &Path,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> Result<(QemuProbe, Qmp, CounterReader), String> {
    let socks = [0, 1].map(|i| dir.join(format!("{name}-{i}.qmp")));
    let mut c = QemuProbeConfig::new(qemu, MEMORY_MIB as u32);
    for s in &socks {
        c.extra_args.push("-qmp".into());
        c.extra_args
            .push(format!("unix:{},server=on,wait=off", s.display()));
    }
    c.extra_args.extend(extra.iter().map(|s| s.to_string()));
    let p = c
        .spawn()
        .map_err(|e| format!("starting {}: {e}", qemu.display()))?;
    let a = Qmp::connect(&socks[0], T)?;
    let mut b = Qmp::connect(&socks[1], T)?;
    let counter = CounterReader::open(&mut b, p.pid())?;
    Ok((p, a, counter))
}

/// Reads the probe's counter straight from QEMU's guest RAM (`/proc/PID/mem` at the host
/// address HMP `gpa2hva` names once), as the Vireo side reads its workers' RAM files: an HMP
/// `xp` per read was a monitor round trip, up to a read's time added to QEMU's gap only.
struct CounterReader {
    mem: std::fs::File,
    hva: u64,
}

impl CounterReader {
    fn open(q: &mut Qmp, pid: u32) -> Result<Self, String> {
        // "Host virtual address for 0x80018 (pc.ram) is 0x7f5b2c080018"
        let out = q.hmp(&format!("gpa2hva {DIRTY_PAGES:#x}"))?;
        let hva = out
            .split_whitespace()
            .last()
            .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            .ok_or_else(|| format!("qemu: cannot parse gpa2hva output {out:?}"))?;
        let path = format!("/proc/{pid}/mem");
        let mem = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        Ok(CounterReader { mem, hva })
    }

    fn read(&self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&self.mem, &mut b, self.hva)
            .map_err(|e| format!("reading QEMU's guest RAM: {e}"))?;
        Ok(u64::from_le_bytes(b))
    }
}

fn multifd(q: &mut Qmp) -> Result<(), String> {
    q.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": true}]}),
    )?;
    q.execute("migrate-set-parameters", json!({"multifd-channels": 2}))?;
    Ok(())
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("port: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

pub fn run(qemu: &Path, dir: &Path, case: &Case, seed: u64) -> Result<Sample, String> {
    let uri = format!("tcp:127.0.0.1:{}", free_port()?);
    let dst_spawned = Instant::now();
    let (_dst, mut dq, dwatch) = spawn(qemu, dir, "dst", &["-incoming", "defer"])?;
    multifd(&mut dq)?;
    dq.execute("migrate-incoming", json!({ "uri": uri }))?;
    let dst_start = dst_spawned.elapsed();
    let (mut src, mut sq, swatch) = spawn(qemu, dir, "src", &[])?;
    src.console
        .wait_ready(T)
        .map_err(|e| format!("qemu: {e}"))?;
    super::prepare(&mut src.console, case, seed)?;
    multifd(&mut sq)?;
    sq.execute(
        "migrate-set-parameters",
        json!({"downtime-limit": case.max_downtime_ms, "max-bandwidth": 100u64 << 30}),
    )?;
    let watch = Watch::start(
        Box::new(move || swatch.read().map(Some)),
        // Read whatever its state: before its guest runs, the destination's counter holds
        // only values the source had (see `watch.rs`).
        Box::new(move || dwatch.read().map(Some)),
        T,
    );
    let t = Instant::now();
    sq.execute("migrate", json!({ "uri": uri }))?;
    let deadline = Instant::now() + T;
    let info = loop {
        let info = sq.execute("query-migrate", json!({}))?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => return Err(format!("qemu migrate: {info}")),
            _ if Instant::now() > deadline => {
                let _ = sq.execute("migrate_cancel", json!({}));
                return Err(format!("qemu migrate did not complete in {T:?}: {info}"));
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    let total = t.elapsed();
    // The destination's guest runs by now or very soon: wait until its watcher sees it move.
    // The source's counter is final now: wait until the destination's guest went past it.
    watch.dest_above(watch.source_settled(T), Duration::from_secs(10));
    let (s, d) = watch.finish()?;
    Ok(Sample {
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        guest_gap_ms: gap_ms(&s, &d).map_err(|e| format!("qemu: {e}"))?,
        total_ms: total.as_secs_f64() * 1e3,
        // QEMU's source process outlives `completed` (it is told to quit): its end is that.
        total_to_exit_ms: total.as_secs_f64() * 1e3,
        destination_start_ms: dst_start.as_secs_f64() * 1e3,
        rounds: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
        transferred_mib: info["ram"]["transferred"].as_f64().unwrap_or(f64::NAN) / (1 << 20) as f64,
    })
}
