//! Metering and storage QoS of `vireo-vm` with the probe guest under KVM: the `metrics` numbers
//! against what the probe did, a `max_iops` disk held back by at least what its bucket
//! guarantees while its neighbour is not, and a starved `min_iops` disk raising one alert.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use vireo_api::worker::{DiskMetrics, WorkerMetrics, WorkerOp, WorkerReply};
use vireo_api::{DiskFormat, DiskSpec};
use vireo_probe_image::ProbeConsole;
use vireo_virtio::block::qos::burst;

fn disk(dir: &Path, name: &str, max_iops: Option<u32>, min_iops: Option<u32>) -> DiskSpec {
    DiskSpec {
        path: raw_disk(dir, name, 4 << 20),
        read_only: false,
        format: Some(DiskFormat::Raw),
        serial: Some(name.replace('.', "-")),
        max_iops,
        min_iops,
        queues: None,
    }
}

fn metrics(w: &Worker) -> WorkerMetrics {
    match w.ask(WorkerOp::Metrics) {
        WorkerReply::Metrics(m) => m,
        other => panic!("Metrics answered {other:?}"),
    }
}

/// `after - before` of the counters the tests compare.
fn delta(after: &DiskMetrics, before: &DiskMetrics) -> [u64; 6] {
    [
        after.write_bytes - before.write_bytes,
        after.write_ops - before.write_ops,
        after.read_bytes - before.read_bytes,
        after.read_ops - before.read_ops,
        after.flush_ops - before.flush_ops,
        after.normalized_ios - before.normalized_ios,
    ]
}

fn ok(console: &mut ProbeConsole, cmd: &str) -> Duration {
    let start = Instant::now();
    let answer = console
        .command(cmd, T)
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(answer.starts_with("OK"), "{cmd}: {answer}");
    start.elapsed()
}

#[test]
fn metrics_count_what_the_probe_did() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = probe_spec();
    spec.disks.push(disk(dir.path(), "a.img", None, None));
    spec.disks.push(disk(dir.path(), "b.img", None, None));
    let w = Worker::start(spec.clone());
    w.wait_console("PROBE READY");
    let mut console = w.probe_console();
    let before = metrics(&w);
    assert_eq!(before.memory_bytes, 64 << 20);
    let paths: Vec<_> = before.disks.iter().map(|d| d.path.clone()).collect();
    assert_eq!(
        paths,
        [spec.disks[0].path.clone(), spec.disks[1].path.clone()]
    );
    assert_eq!(before.disks[1].serial.as_deref(), Some("b-img"));
    assert!(before.uptime_ns > 0);
    assert!(before.worker_private_bytes > 0, "{before:?}");
    assert!(
        before.memory_resident_bytes <= before.memory_bytes,
        "{before:?}"
    );

    // Three 16-sector writes, three 16-sector reads, a flush, and a GET_ID (not an IO).
    for (i, seed) in [11, 12, 13].into_iter().enumerate() {
        ok(&mut console, &format!("DISK 0 WRITE {} 16 {seed}", i * 16));
    }
    for (i, seed) in [11, 12, 13].into_iter().enumerate() {
        ok(&mut console, &format!("DISK 0 VERIFY {} 16 {seed}", i * 16));
    }
    ok(&mut console, "DISK 0 FLUSH");
    ok(&mut console, "DISK 0 ID");
    let after = metrics(&w);
    let bytes = 3 * 16 * 512;
    assert_eq!(
        delta(&after.disks[0], &before.disks[0]),
        [bytes, 3, bytes, 3, 1, 3 + 3 + 1],
        "{after:?}"
    );
    assert_eq!(delta(&after.disks[1], &before.disks[1]), [0; 6]);
    assert_eq!(after.disks[0].throttled_ns, 0);
    assert_eq!(after.disks[0].min_iops_alerts, 0);
    // A 64 KiB write is eight normalized IOs.
    ok(&mut console, "DISK 1 WRITE 0 128 5");
    let later = metrics(&w);
    assert_eq!(
        delta(&later.disks[1], &after.disks[1]),
        [65536, 1, 0, 0, 0, 8]
    );

    // Guest RAM the probe touches becomes resident; its CPU work shows as vCPU time.
    let cpu_before = metrics(&w);
    ok(&mut console, "MEM FILL 8 48 1");
    let filled = metrics(&w);
    assert!(
        filled.memory_resident_bytes >= 48 << 20,
        "after filling 48 MiB: {filled:?}"
    );
    let deadline = Instant::now() + T;
    let mut seed = 2;
    let grown = loop {
        ok(&mut console, &format!("MEM FILL 8 48 {seed}"));
        ok(&mut console, &format!("MEM VERIFY 8 48 {seed}"));
        seed += 1;
        let m = metrics(&w);
        if m.vcpu_cpu_ns > cpu_before.vcpu_cpu_ns && m.worker_cpu_ns > cpu_before.worker_cpu_ns {
            break m;
        }
        assert!(Instant::now() < deadline, "CPU time never grew: {m:?}");
    };
    eprintln!("before the CPU work: {cpu_before:?}\nafter: {grown:?}");
    assert!(grown.vcpu_cpu_ns <= grown.worker_cpu_ns, "{grown:?}");
    assert!(grown.uptime_ns > cpu_before.uptime_ns);
    assert!(grown.memory_resident_bytes <= grown.memory_bytes);
}

#[test]
fn max_iops_holds_its_disk_back_and_not_the_other() {
    if !kvm() {
        return;
    }
    let max = 200;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = probe_spec();
    spec.disks
        .push(disk(dir.path(), "limited.img", Some(max), None));
    spec.disks.push(disk(dir.path(), "free.img", None, None));
    let w = Worker::start(spec);
    w.wait_console("PROBE READY");
    let mut console = w.probe_console();
    let before = metrics(&w);
    // The same 2 MiB on each disk, the unlimited one first, in the same run.
    let workload = |console: &mut ProbeConsole, disk: usize| {
        let mut took = Duration::ZERO;
        for (i, seed) in [21, 22].into_iter().enumerate() {
            took += ok(
                console,
                &format!("DISK {disk} WRITE {} 2048 {seed}", i * 2048),
            );
        }
        took
    };
    let free_took = workload(&mut console, 1);
    let limited_took = workload(&mut console, 0);
    let after = metrics(&w);
    let (limited, free) = (&after.disks[0], &after.disks[1]);
    let ios = limited.normalized_ios - before.disks[0].normalized_ios;
    assert_eq!(ios, free.normalized_ios - before.disks[1].normalized_ios);
    assert_eq!(ios, 2 * 2048 * 512 / 8192);
    // The bucket's guarantee: N IOs take at least (N - max(burst, largest request)) / rate.
    // The probe's requests are at most 512 KiB: 64 IOs.
    let floor = Duration::from_secs_f64((ios - burst(max).max(64)) as f64 / f64::from(max));
    eprintln!("{ios} IOs: limited {limited_took:?} (floor {floor:?}), free {free_took:?}");
    eprintln!("{limited:?}\n{free:?}");
    assert!(
        limited_took >= floor,
        "{ios} IOs at {max} IOPS took {limited_took:?} (< {floor:?})"
    );
    assert!(limited.throttled_ns > 0, "{limited:?}");
    assert_eq!(free.throttled_ns, 0, "{free:?}");
    assert!(
        free_took < limited_took,
        "unlimited {free_took:?}, limited {limited_took:?}"
    );
    // Held requests were put back and served whole: the data is right.
    ok(&mut console, "DISK 0 VERIFY 0 2048 21");
    ok(&mut console, "DISK 0 VERIFY 2048 2048 22");
    assert_eq!(metrics(&w).disks[0].min_iops_alerts, 0);
}

#[test]
fn a_starved_min_iops_disk_raises_one_alert_per_episode() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = probe_spec();
    // vireod refuses min_iops above max_iops (validate_spec); the worker trusts the spec it
    // is given, which lets this test starve the disk on purpose: at 10 IOPS a 1 MiB write
    // (two 64-IO requests) keeps the disk busy ~6.4 s, well under 50 IOs a second.
    spec.disks
        .push(disk(dir.path(), "starved.img", Some(10), Some(50)));
    spec.disks
        .push(disk(dir.path(), "other.img", None, Some(50)));
    let w = Worker::start(spec);
    w.wait_console("PROBE READY");
    let mut console = w.probe_console();
    let took = ok(&mut console, "DISK 0 WRITE 0 2048 3");
    assert!(took >= Duration::from_secs_f64(6.3), "{took:?}");
    let m = metrics(&w);
    eprintln!("{took:?}: {:?}", m.disks[0]);
    assert_eq!(m.disks[0].min_iops_alerts, 1, "{m:?}");
    assert!(m.disks[0].min_iops_alert_active, "{m:?}");
    // A disk that was never busy is never "not met".
    assert_eq!(m.disks[1].min_iops_alerts, 0);
    ok(&mut console, "DISK 1 WRITE 0 2048 3");
    // Idle now: the next window has no demand and ends the episode.
    let deadline = Instant::now() + T;
    while metrics(&w).disks[0].min_iops_alert_active {
        assert!(Instant::now() < deadline, "the episode never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = metrics(&w);
    assert_eq!(m.disks[0].min_iops_alerts, 1);
    assert_eq!(m.disks[1].min_iops_alerts, 0);
    let log = w.log();
    assert_eq!(
        log.matches("minimum IOPS not met").count(),
        1,
        "one warning per episode; log:\n{log}"
    );
    assert!(
        log.contains("virtio-blk starved-img: minimum IOPS not met"),
        "{log}"
    );
}
