//! Pause, resume and reset of a running probe VM through `worker.sock`, checked against what
//! the guest itself shows: its status page (read by the host straight from the worker's
//! guest-memory memfd), its console and its memory and disk patterns.

use crate::common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::*;
use vireo_api::worker::{WorkerExitReason, WorkerOp, WorkerReply, WorkerStatus};
use vireo_api::{DiskFormat, DiskSpec};
use vireo_probe_image::ProbeError;

/// The probe's status page (docs/probe-protocol.md).
const STATUS_PAGE: u64 = 0x80000;
const PASSES: u64 = STATUS_PAGE + 8;
const HEARTBEAT_1: u64 = STATUS_PAGE + 64 + 8;

/// The worker's guest RAM, opened through `/proc/PID/fd` (RAM below 3 GiB sits at file
/// offset = guest-physical address).
fn guest_ram(w: &Worker) -> File {
    let dir = format!("/proc/{}/fd", w.child.id());
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let target = std::fs::read_link(&path).unwrap_or_default();
        if target
            .to_string_lossy()
            .ends_with(vireo_worker::metrics::GUEST_RAM_MAPPING)
        {
            return File::open(&path).unwrap();
        }
    }
    panic!("no guest-RAM file in {dir}");
}

fn read_u64(ram: &File, gpa: u64) -> u64 {
    let mut b = [0u8; 8];
    ram.read_exact_at(&mut b, gpa).unwrap();
    u64::from_le_bytes(b)
}

/// Waits (bounded) until the u64 at `gpa` differs from `from`.
fn wait_advance(ram: &File, gpa: u64, from: u64) -> u64 {
    let deadline = Instant::now() + T;
    loop {
        let now = read_u64(ram, gpa);
        if now != from {
            return now;
        }
        assert!(Instant::now() < deadline, "{gpa:#x} stuck at {from}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn status(w: &Worker) -> WorkerStatus {
    match w.ask(WorkerOp::Status) {
        WorkerReply::Status(s) => s,
        other => panic!("Status answered {other:?}"),
    }
}

fn disk_write_ops(w: &Worker) -> u64 {
    match w.ask(WorkerOp::Metrics) {
        WorkerReply::Metrics(m) => m.disks[0].write_ops,
        other => panic!("Metrics answered {other:?}"),
    }
}

fn with_disk(spec: &mut vireo_api::VmSpec, dir: &std::path::Path) -> std::path::PathBuf {
    let path = raw_disk(dir, "data.img", 32 << 20);
    spec.disks.push(DiskSpec {
        path: path.clone(),
        read_only: false,
        format: Some(DiskFormat::Raw),
        serial: None,
        max_iops: None,
        min_iops: None,
        queues: None,
    });
    path
}

#[test]
fn pause_freezes_vcpus_and_console_and_resume_continues() {
    if !kvm() {
        return;
    }
    let mut spec = probe_spec();
    spec.vcpus = 2;
    let w = Worker::start(spec);
    w.wait_console("PROBE READY");
    let mut console = w.probe_console();
    let ram = guest_ram(&w);
    assert!(console
        .command("DIRTY START 8 16 0", T)
        .unwrap()
        .starts_with("OK"));
    let p = wait_advance(&ram, PASSES, 0);
    wait_advance(&ram, HEARTBEAT_1, 0);
    wait_advance(&ram, PASSES, p);
    assert!(!status(&w).paused);

    assert_eq!(w.ask(WorkerOp::Pause), WorkerReply::Ok);
    let st = status(&w);
    assert!(st.paused && st.running, "{st:?}");
    let (passes, beat) = (read_u64(&ram, PASSES), read_u64(&ram, HEARTBEAT_1));
    // A command sent while paused is not answered...
    console.send_line("PING").unwrap();
    match console.answer(Duration::from_millis(500)) {
        Err(ProbeError::Timeout { .. }) => {}
        other => panic!("a paused probe answered: {other:?}"),
    }
    // ... and neither vCPU moved: the BSP's pass counter and the AP's heartbeat stand still.
    assert_eq!(read_u64(&ram, PASSES), passes);
    assert_eq!(read_u64(&ram, HEARTBEAT_1), beat);
    // Pausing again is harmless.
    assert_eq!(w.ask(WorkerOp::Pause), WorkerReply::Ok);

    assert_eq!(w.ask(WorkerOp::Resume), WorkerReply::Ok);
    assert_eq!(console.answer(T).unwrap(), "OK PONG");
    wait_advance(&ram, PASSES, passes);
    wait_advance(&ram, HEARTBEAT_1, beat);
    assert!(!status(&w).paused);
    assert_eq!(
        w.ask(WorkerOp::Resume),
        WorkerReply::Ok,
        "resume of a running VM"
    );
    assert!(console
        .command("CPUS", T)
        .unwrap()
        .starts_with("OK online=2"));
    assert!(console
        .command("DIRTY STOP", T)
        .unwrap()
        .starts_with("OK passes="));
}

/// Twenty pauses, each while a 4 MiB disk write is in flight and the DIRTY workload runs:
/// nothing moves while paused (not even the disk: its completed-write counter stands still),
/// and afterwards memory and disk verify.
#[test]
fn pause_resume_twenty_times_during_writes_loses_nothing() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = probe_spec();
    let disk = with_disk(&mut spec, dir.path());
    let w = Worker::start(spec);
    w.wait_console("PROBE READY");
    let mut console = w.probe_console();
    let ram = guest_ram(&w);
    console.command("MEM FILL 32 16 99", T).unwrap();
    console.command("DIRTY START 8 16 0", T).unwrap();
    let start = wait_advance(&ram, PASSES, 0);
    const SECTORS: u64 = 8192;
    for i in 0..20u64 {
        console
            .send_line(&format!(
                "DISK 0 WRITE {} {SECTORS} {}",
                i * SECTORS / 4,
                1000 + i
            ))
            .unwrap();
        // Pause in the middle of the burst (the probe keeps 4 requests in flight).
        std::thread::sleep(Duration::from_millis(i % 5));
        assert_eq!(w.ask(WorkerOp::Pause), WorkerReply::Ok, "pause {i}");
        let (passes, writes) = (read_u64(&ram, PASSES), disk_write_ops(&w));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(read_u64(&ram, PASSES), passes, "pause {i}: the guest ran");
        assert_eq!(disk_write_ops(&w), writes, "pause {i}: the disk worked on");
        assert!(status(&w).paused);
        assert_eq!(w.ask(WorkerOp::Resume), WorkerReply::Ok, "resume {i}");
        let answer = console.answer(T).unwrap();
        assert!(answer.starts_with("OK"), "write {i}: {answer}");
    }
    assert!(read_u64(&ram, PASSES) > start);
    let stop = console.command("DIRTY STOP", T).unwrap();
    assert!(stop.starts_with("OK passes="), "{stop}");
    assert_eq!(console.command("MEM VERIFY 32 16 99", T).unwrap(), "OK");
    // Each write overlapped the next; the later seed wins over the overlap.
    for i in 0..20u64 {
        let (lba, count) = (i * SECTORS / 4, if i == 19 { SECTORS } else { SECTORS / 4 });
        let verify = format!("DISK 0 VERIFY {lba} {count} {}", 1000 + i);
        assert_eq!(console.command(&verify, T).unwrap(), "OK", "{verify}");
    }
    console.command("DISK 0 FLUSH", T).unwrap();
    assert_eq!(w.ask(WorkerOp::TurnOff), WorkerReply::Ok);
    let mut w = w;
    assert_eq!(w.wait_exit().1.unwrap().reason, WorkerExitReason::TurnedOff);
    // The host sees the last write in the file.
    let bytes = std::fs::read(&disk).unwrap();
    let at = (19 * SECTORS / 4 * 512) as usize;
    let mut want = vec![0u8; (SECTORS * 512) as usize];
    vireo_probe_image::pattern::fill(&mut want, 1019, at as u64);
    assert!(
        bytes[at..at + want.len()] == want[..],
        "last write not on disk"
    );
}

/// The device side of a pause, made visible by a `max_iops` disk: its requests wait in the
/// ring for the token bucket, so a worker that was not quiesced would go on completing them
/// while the vCPUs are parked. Paused, the completed-write counter stands still; resumed,
/// the write finishes whole.
#[test]
fn a_paused_disk_completes_nothing_until_resume() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = probe_spec();
    with_disk(&mut spec, dir.path());
    spec.disks[0].max_iops = Some(400);
    let w = Worker::start(spec);
    w.wait_console("PROBE READY");
    let mut console = w.probe_console();
    // 4 MiB = 512 normalized IOs: about 1.3 s at 400 IOPS, in 8 requests of 512 KiB.
    console.send_line("DISK 0 WRITE 0 8192 77").unwrap();
    let deadline = Instant::now() + T;
    while disk_write_ops(&w) == 0 {
        assert!(Instant::now() < deadline, "the write never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(w.ask(WorkerOp::Pause), WorkerReply::Ok);
    let writes = disk_write_ops(&w);
    assert!(writes < 8, "the write finished before the pause: {writes}");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        disk_write_ops(&w),
        writes,
        "the disk worked on while paused"
    );
    assert_eq!(w.ask(WorkerOp::Resume), WorkerReply::Ok);
    assert!(console.answer(T).unwrap().starts_with("OK"));
    assert_eq!(disk_write_ops(&w), 8);
    assert_eq!(console.command("DISK 0 VERIFY 0 8192 77", T).unwrap(), "OK");
}

#[test]
fn turn_off_while_paused_ends_turned_off_with_the_disk_flushed() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = probe_spec();
    let disk = with_disk(&mut spec, dir.path());
    let mut w = Worker::start(spec);
    w.wait_console("PROBE READY");
    let mut console = w.probe_console();
    console.command("DISK 0 WRITE 64 256 42", T).unwrap();
    assert_eq!(w.ask(WorkerOp::Pause), WorkerReply::Ok);
    assert_eq!(w.ask(WorkerOp::TurnOff), WorkerReply::Ok);
    let (code, exit) = w.wait_exit();
    assert_eq!(code, Some(0), "log:\n{}", w.log());
    assert_eq!(exit.unwrap().reason, WorkerExitReason::TurnedOff);
    let bytes = std::fs::read(&disk).unwrap();
    let mut want = vec![0u8; 256 * 512];
    vireo_probe_image::pattern::fill(&mut want, 42, 64 * 512);
    assert!(bytes[64 * 512..(64 + 256) * 512] == want[..]);
}

fn ready_count(w: &Worker) -> usize {
    let WorkerReply::ConsoleLog { data_base64, .. } =
        w.ask(WorkerOp::ConsoleLog { max_bytes: 1 << 20 })
    else {
        panic!("ConsoleLog answered otherwise");
    };
    String::from_utf8_lossy(&decode(&data_base64))
        .matches("PROBE READY")
        .count()
}

fn wait_ready_count(w: &Worker, n: usize) {
    let deadline = Instant::now() + T;
    while ready_count(w) < n {
        assert!(Instant::now() < deadline, "PROBE READY #{n} never came");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A hard reset: the probe boots again on both vCPUs (a second `PROBE READY`, two CPUs online),
/// its memory is wiped (a pattern written before no longer verifies), the disk works again and
/// keeps its data; a reset of a paused VM leaves it running.
#[test]
fn reset_boots_the_guest_again_in_the_same_worker() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = probe_spec();
    spec.vcpus = 2;
    with_disk(&mut spec, dir.path());
    let w = Worker::start(spec);
    w.wait_console("PROBE READY");
    let pid = w.child.id();
    let mut console = w.probe_console();
    console.command("MEM FILL 16 8 7", T).unwrap();
    console.command("DISK 0 WRITE 0 128 5", T).unwrap();
    assert_eq!(ready_count(&w), 1);

    assert_eq!(w.ask(WorkerOp::Reset), WorkerReply::Ok);
    wait_ready_count(&w, 2);
    let mut console = w.probe_console();
    assert_eq!(console.command("PING", T).unwrap(), "OK PONG");
    // The AP started over too (at the PVH entry, as at boot): it registered again in the wiped
    // status page ("vCPUs online", INFO's cpus) and beats.
    let deadline = Instant::now() + T;
    loop {
        let info = console.command("INFO", T).unwrap();
        if info.ends_with("cpus=2") {
            break;
        }
        assert!(Instant::now() < deadline, "{info}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let cpus = console.command("CPUS", T).unwrap();
    assert!(cpus.starts_with("OK online=2"), "{cpus}");
    match console.command("MEM VERIFY 16 8 7", T) {
        Err(ProbeError::Err(e)) => assert!(e.starts_with("mismatch"), "{e}"),
        other => panic!("memory survived the reset: {other:?}"),
    }
    assert_eq!(console.command("DISK 0 VERIFY 0 128 5", T).unwrap(), "OK");
    console.command("DISK 0 WRITE 128 128 6", T).unwrap();

    // Reset while paused: the guest starts again and runs.
    assert_eq!(w.ask(WorkerOp::Pause), WorkerReply::Ok);
    assert_eq!(w.ask(WorkerOp::Reset), WorkerReply::Ok);
    assert!(!status(&w).paused);
    wait_ready_count(&w, 3);
    let mut console = w.probe_console();
    assert_eq!(console.command("DISK 0 VERIFY 128 128 6", T).unwrap(), "OK");
    let WorkerReply::Hello { pid: same, .. } = w.ask(WorkerOp::Hello) else {
        panic!("no Hello");
    };
    assert_eq!(same, pid, "the same worker process");
    assert!(status(&w).running);
}
