//! Live migration between two `vireo-vm` processes on this machine (docs/migration.md): two
//! host identities in temp dirs trusting each other, the destination listening on
//! 127.0.0.1 port 0. The probe dirties memory and has a disk: after the migration the
//! destination runs the workload on, its memory and disk hold what the source's did, and the
//! source exited `MigratedAway`. A cancel, an untrusted destination and a destination killed
//! mid-copy each leave the source running.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::migration::{
    incoming, listening, migrate_out, ok, pair, spec, status, wait_status, Host,
};
use common::{kvm, raw_disk, Worker};
use vireo_api::worker::{CompressMode, MigrateState, WorkerExitReason, WorkerOp, WorkerReply};
use vireo_probe_image::ProbeConsole;

/// A running source with the DIRTY workload on 64 MiB, its disk written; returns the probe
/// console and the sum of a filled region.
fn source(disk: &Path, fill_mib: u64) -> (Worker, ProbeConsole, String) {
    let src = Worker::start(spec(disk, "MIG0"));
    src.wait_console("PROBE READY");
    let mut c = src.probe_console();
    ok(&mut c, "DISK 0 WRITE 0 256 11");
    ok(&mut c, "DISK 0 FLUSH");
    ok(&mut c, &format!("MEM FILL 100 {fill_mib} 7"));
    let sum = ok(&mut c, &format!("MEM SUM 100 {fill_mib}"));
    ok(&mut c, "DIRTY START 16 64 0");
    (src, c, sum)
}

fn destination(disk: &Path, host: &Host, session: uuid::Uuid, streams: u16) -> Worker {
    incoming(spec(disk, "MIG0"), host, session, streams)
}

fn disk_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = raw_disk(d.path(), "disk.img", 64 << 20);
    (d, p)
}

#[test]
fn kvm_migrate_two_streams_zstd_the_guest_runs_on_at_the_destination() {
    if !kvm() {
        return;
    }
    let (a, b) = pair();
    let (_d, disk) = disk_dir();
    let (mut src, _src_console, sum) = source(&disk, 16);
    std::thread::sleep(Duration::from_millis(300));
    let session = uuid::Uuid::new_v4();
    let mut dst = destination(&disk, &b, session, 2);
    let to = listening(&dst);
    assert_eq!(status(&dst).state, MigrateState::Listening);
    let started = Instant::now();
    migrate_out(&src, to, session, &a, 2, CompressMode::Zstd, None);
    let (code, exit) = src.wait_exit();
    let total = started.elapsed();
    let exit = exit.unwrap_or_else(|| panic!("no exit.json; log:\n{}", src.log()));
    let WorkerExitReason::MigratedAway {
        to: went,
        downtime_ms,
        progress,
    } = exit.reason
    else {
        panic!("source exited {:?}; log:\n{}", exit.reason, src.log());
    };
    // With VIREO_LOG=vireo_vmm=debug, the source's per-round decisions end up in this file.
    if let Ok(keep) = std::env::var("VIREO_TEST_KEEP_LOG") {
        std::fs::write(keep, src.log()).unwrap();
    }
    assert_eq!(code, Some(0));
    assert_eq!(went, to.to_string());
    // The exit record carries the migration's final figures (vireod's job shows them even
    // when the worker finished between two polls).
    let last = progress.expect("MigratedAway carries the final progress");
    assert_eq!(last.state, MigrateState::Completed, "{last:?}");
    assert_eq!(last.downtime_ms, Some(downtime_ms), "{last:?}");
    // Round 0 is possible: on a loaded machine the guest may dirty so little during the full
    // pass that the rest fits the pause at once.
    assert!(last.transferred_bytes > 0, "{last:?}");
    let p = wait_status(&dst, "destination completed", |p| {
        p.state == MigrateState::Completed
    });
    eprintln!(
        "256 MiB probe dirtying a 64 MiB hot set, 2 TLS streams, zstd: downtime {downtime_ms} ms \
         (source pause -> destination RUNNING, disk handoff included), total {} ms, \
         {} MiB received",
        total.as_millis(),
        p.transferred_bytes >> 20
    );
    // The guest runs on at the destination: its workload, memory and disk are the source's.
    let mut c = dst.probe_console();
    let stop = ok(&mut c, "DIRTY STOP");
    let field = |name: &str| -> u64 {
        stop.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_else(|| panic!("{stop}"))
            .parse()
            .unwrap()
    };
    let (passes, pages) = (field("passes="), field("pages="));
    // Whole passes need guest speed a loaded machine may not give; pages written do not.
    assert!(pages > 0, "{stop}");
    // Every pass writes all 16384 pages of the range: counter and page count moved together.
    assert_eq!(pages / (64 * 256), passes, "{stop}");
    assert_eq!(ok(&mut c, "MEM SUM 100 16"), sum);
    ok(&mut c, "DISK 0 VERIFY 0 256 11");
    ok(&mut c, "DISK 0 WRITE 512 8 12");
    ok(&mut c, "DISK 0 FLUSH");
    assert_eq!(dst.ask(WorkerOp::TurnOff), WorkerReply::Ok);
    let (_, exit) = dst.wait_exit();
    assert_eq!(exit.unwrap().reason, WorkerExitReason::TurnedOff);
}

/// A source whose first pass lasts long (128 MiB of data, 8 MiB/s), with its destination
/// receiving: returns both once bytes are moving.
fn slow_migration(a: &Host, b: &Host, disk: &Path) -> (Worker, ProbeConsole, Worker) {
    let (src, c, _) = source(disk, 128);
    let session = uuid::Uuid::new_v4();
    let dst = destination(disk, b, session, 1);
    let to = listening(&dst);
    migrate_out(&src, to, session, a, 1, CompressMode::None, Some(8 << 20));
    wait_status(&src, "pre-copy moving", |p| {
        p.state == MigrateState::Precopy && p.transferred_bytes > 0
    });
    (src, c, dst)
}

/// The source runs as before: not paused, the guest answers and its workload advances.
fn still_running(src: &Worker, c: &mut ProbeConsole) {
    let WorkerReply::Status(st) = src.ask(WorkerOp::Status) else {
        panic!("no status")
    };
    assert!(st.running && !st.paused, "{st:?}");
    ok(c, "DIRTY STOP");
    ok(c, "DIRTY START 16 8 0");
    std::thread::sleep(Duration::from_millis(100));
    let stop = ok(c, "DIRTY STOP");
    assert!(
        !stop.ends_with(" pages=0"),
        "the workload did not advance: {stop}"
    );
    ok(c, "DISK 0 VERIFY 0 256 11");
}

#[test]
fn kvm_migrate_cancelled_in_precopy_keeps_the_source_running() {
    if !kvm() {
        return;
    }
    let (a, b) = pair();
    let (_d, disk) = disk_dir();
    let (src, mut c, mut dst) = slow_migration(&a, &b, &disk);
    assert_eq!(src.ask(WorkerOp::MigrateCancel), WorkerReply::Ok);
    let p = wait_status(&src, "cancelled", |p| p.state == MigrateState::Cancelled);
    assert!(p.message.is_some());
    still_running(&src, &mut c);
    let (_, exit) = dst.wait_exit();
    assert!(
        matches!(
            exit.as_ref().map(|e| &e.reason),
            Some(WorkerExitReason::StartFailed { .. })
        ),
        "{exit:?}"
    );
}

#[test]
fn kvm_migrate_to_a_killed_destination_keeps_the_source_running() {
    if !kvm() {
        return;
    }
    let (a, b) = pair();
    let (_d, disk) = disk_dir();
    let (src, mut c, mut dst) = slow_migration(&a, &b, &disk);
    dst.signal(libc::SIGKILL);
    dst.wait_exit();
    let p = wait_status(&src, "failed", |p| p.state == MigrateState::Failed);
    eprintln!("after the destination was killed: {:?}", p.message);
    still_running(&src, &mut c);
}

#[test]
fn kvm_migrate_to_an_untrusted_destination_is_refused_before_any_page() {
    if !kvm() {
        return;
    }
    let (a, b) = pair();
    // The source trusts only some other host.
    let other = Host::new("other.test");
    a.trust(&[&other]);
    let (_d, disk) = disk_dir();
    let (src, mut c, _) = source(&disk, 16);
    let session = uuid::Uuid::new_v4();
    let dst = destination(&disk, &b, session, 1);
    let to = listening(&dst);
    migrate_out(&src, to, session, &a, 1, CompressMode::Auto, None);
    let p = wait_status(&src, "refused", |p| p.state == MigrateState::Failed);
    let msg = p.message.clone().unwrap_or_default();
    assert!(msg.contains("ertificate"), "{msg}");
    assert_eq!(p.transferred_bytes, 0, "{p:?}");
    assert_eq!(status(&dst).transferred_bytes, 0);
    assert_eq!(status(&dst).state, MigrateState::Listening);
    still_running(&src, &mut c);
}

#[test]
fn kvm_migrate_destination_that_cannot_open_the_disk_gives_the_vm_back() {
    if !kvm() {
        return;
    }
    let (a, b) = pair();
    let (d, disk) = disk_dir();
    let (mut src, mut c, _) = source(&disk, 16);
    let session = uuid::Uuid::new_v4();
    // The destination's spec names a disk file that is not there: it finds out only at the
    // handoff, after the source released its disk.
    let dst = destination(&d.path().join("missing.img"), &b, session, 1);
    let to = listening(&dst);
    migrate_out(&src, to, session, &a, 1, CompressMode::Lz4, None);
    let p = wait_status(&src, "failed", |p| p.state == MigrateState::Failed);
    let msg = p.message.clone().unwrap_or_default();
    assert!(msg.contains("missing.img"), "{msg}");
    assert!(
        src.log().contains("opened again after the failed handoff"),
        "{}",
        src.log()
    );
    still_running(&src, &mut c);
    ok(&mut c, "DISK 0 WRITE 1024 8 13");
    ok(&mut c, "DISK 0 VERIFY 1024 8 13");
    assert_eq!(src.ask(WorkerOp::TurnOff), WorkerReply::Ok);
    let (_, exit) = src.wait_exit();
    assert_eq!(exit.unwrap().reason, WorkerExitReason::TurnedOff);
}
