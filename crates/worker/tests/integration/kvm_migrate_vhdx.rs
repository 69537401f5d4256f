//! Live migration of a probe VM whose disk is a VHDX, between two `vireo-vm` processes sharing
//! the disk's folder (docs/migration.md, "Tests"), while the guest keeps writing its disk.
//!
//! The guest writes a distinct pattern per request (its own seed, never rewritten), so a write
//! acknowledged before or during the migration and lost in the handoff cannot be hidden by a
//! later one. After the move the destination's guest verifies every acknowledged write, the
//! earlier data and (for a differencing child) its parent's data; then the host checks the
//! files with vireo-vhdx's checker, reads the writes back itself, and finds the disk locked by
//! the destination alone. A dynamic VHDX with 1 MiB blocks allocates blocks (metadata writes)
//! all through the migration; the differencing child adds a parent both hosts open shared.
//!
//! The fault run: the destination worker SIGKILLed in the middle of the copy leaves the VM
//! running on the source with its memory and disk intact and the VHDX clean.

use crate::common;

use std::path::{Path, PathBuf};

use common::migration::{incoming, listening, migrate_out, ok, pair, spec, status, wait_status};
use common::{kvm, Worker, T};
use vireo_api::worker::{CompressMode, MigrateState, WorkerExitReason, WorkerOp, WorkerReply};
use vireo_api::VmSpec;
use vireo_block::BlockBackend;
use vireo_probe_image::{pattern, ProbeConsole, ProbeError};
use vireo_vhdx::{CreateOptions, OpenOptions, Vhdx, VhdxError};

const DISK_BYTES: u64 = 64 << 20;
const SECTORS: u64 = DISK_BYTES / 512;
/// Data the guest writes before the migration.
const EARLY: (u64, u64, u64) = (0, 2048, 11);
/// Data a differencing child's parent holds (8 MiB), partly under `EARLY`.
const PARENT: (u64, u64, u64) = (0, 16384, 3);
/// The guest's writes during the migration start here, past both.
const FIRST_LOOP_LBA: u64 = 16384;
const WRITE_SECTORS: u64 = 64;

fn dynamic(path: &Path) {
    Vhdx::create(
        path,
        &CreateOptions {
            size: DISK_BYTES,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
}

/// A child on a parent that holds `PARENT`'s pattern.
fn differencing(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.vhdx");
    dynamic(&base);
    {
        let v = Vhdx::open(&base, &OpenOptions::default()).unwrap();
        let (lba, count, seed) = PARENT;
        let mut buf = vec![0u8; (count * 512) as usize];
        pattern::fill(&mut buf, seed, lba * 512);
        v.write_at(&buf, lba * 512).unwrap();
        v.flush().unwrap();
    }
    let child = dir.join("child.vhdx");
    Vhdx::create(
        &child,
        &CreateOptions {
            disk_type: vireo_vhdx::DiskType::Differencing,
            parent: Some(base.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    (base, child)
}

/// The probe with 64 MiB of RAM (a shorter copy than the 256 MiB default) on `disk`.
fn vm_spec(disk: &Path) -> VmSpec {
    VmSpec {
        memory_bytes: 64 << 20,
        ..spec(disk, "VHDX0")
    }
}

/// Reads answers until `PING`'s: the answer of a command caught by the switch-over, finished
/// by the destination's guest, may still be queued on its console.
fn synced(c: &mut ProbeConsole) {
    c.send_line("PING").unwrap();
    while c.answer(T).unwrap() != "OK PONG" {}
}

/// A source running the dirty workload with `EARLY` written; returns it, its console and the
/// sum of a filled memory region.
fn source(disk: &Path) -> (Worker, ProbeConsole, String) {
    let src = Worker::start(vm_spec(disk));
    src.wait_console("PROBE READY");
    let mut c = src.probe_console();
    let (lba, count, seed) = EARLY;
    ok(&mut c, &format!("DISK 0 WRITE {lba} {count} {seed}"));
    ok(&mut c, "MEM FILL 40 8 7");
    let sum = ok(&mut c, "MEM SUM 40 8");
    // 2 MiB/s: pages keep changing through the copy, and the copy still converges.
    ok(&mut c, "DIRTY START 16 16 2");
    (src, c, sum)
}

/// Writes one pattern per request until the source's console ends (the VM moved) or the disk
/// is full: the acknowledged writes as (lba, seed).
fn write_until_moved(c: &mut ProbeConsole) -> Vec<(u64, u64)> {
    let mut acked = Vec::new();
    let mut lba = FIRST_LOOP_LBA;
    while lba + WRITE_SECTORS <= SECTORS {
        let seed = 1000 + acked.len() as u64;
        match c.command(&format!("DISK 0 WRITE {lba} {WRITE_SECTORS} {seed}"), T) {
            Ok(_) => acked.push((lba, seed)),
            // The source stopped under the command: its outcome is unknown, not checked.
            Err(ProbeError::Eof) | Err(ProbeError::Io(_)) => break,
            Err(e) => panic!("DISK WRITE at {lba}: {e}"),
        }
        lba += WRITE_SECTORS;
    }
    acked
}

/// The host's own read of the acknowledged writes through vireo-vhdx.
fn host_verifies(disk: &Path, acked: &[(u64, u64)]) {
    let v = Vhdx::open(disk, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; (WRITE_SECTORS * 512) as usize];
    for (lba, seed) in acked {
        v.read_at(&mut buf, lba * 512).unwrap();
        assert_eq!(
            pattern::verify(&buf, *seed, lba * 512),
            None,
            "the write at sector {lba} (seed {seed}) in {}",
            disk.display()
        );
    }
}

fn clean(path: &Path) {
    let report = Vhdx::check(path, false).unwrap();
    assert!(report.clean, "{}: {:?}", path.display(), report.problems);
}

/// Live-migrates a probe VM on `disk` while its guest writes; `parent` is checked too when
/// the disk is a differencing child.
fn migrate_while_writing(disk: &Path, parent: Option<&Path>) {
    let (a, b) = pair();
    let (mut src, mut c, sum) = source(disk);
    let session = uuid::Uuid::new_v4();
    let mut dst = incoming(vm_spec(disk), &b, session, 2);
    let to = listening(&dst);
    // Held to 16 MiB/s: the copy lasts long enough for many guest writes on a quiet machine.
    migrate_out(&src, to, session, &a, 2, CompressMode::Lz4, Some(16 << 20));
    let acked = write_until_moved(&mut c);
    drop(c);
    let (code, exit) = src.wait_exit();
    let exit = exit.unwrap_or_else(|| panic!("no exit.json; log:\n{}", src.log()));
    let WorkerExitReason::MigratedAway { downtime_ms, .. } = exit.reason else {
        panic!("source exited {:?}; log:\n{}", exit.reason, src.log());
    };
    assert_eq!(code, Some(0));
    assert!(
        !acked.is_empty(),
        "no guest write was acknowledged during the migration"
    );
    wait_status(&dst, "destination completed", |p| {
        p.state == MigrateState::Completed
    });
    eprintln!(
        "{}: {} guest writes of {} KiB acknowledged during the migration, downtime {downtime_ms} ms",
        disk.display(),
        acked.len(),
        WRITE_SECTORS / 2,
    );

    // The destination holds the disk, exclusively: the source let go of it.
    match Vhdx::open(disk, &OpenOptions::default()) {
        Err(VhdxError::Locked { .. }) => {}
        Err(e) => panic!("opening {} while the destination runs: {e}", disk.display()),
        Ok(_) => panic!(
            "{} is not locked while the destination runs",
            disk.display()
        ),
    }

    let mut c = dst.probe_console();
    synced(&mut c);
    let stop = ok(&mut c, "DIRTY STOP");
    assert!(
        !stop.ends_with(" pages=0"),
        "the dirty workload stopped: {stop}"
    );
    assert_eq!(ok(&mut c, "MEM SUM 40 8"), sum);
    let (lba, count, seed) = EARLY;
    ok(&mut c, &format!("DISK 0 VERIFY {lba} {count} {seed}"));
    if parent.is_some() {
        let (lba, count, seed) = PARENT;
        let below_early = EARLY.0 + EARLY.1;
        ok(
            &mut c,
            &format!(
                "DISK 0 VERIFY {below_early} {} {seed}",
                lba + count - below_early
            ),
        );
    }
    for (lba, seed) in &acked {
        ok(
            &mut c,
            &format!("DISK 0 VERIFY {lba} {WRITE_SECTORS} {seed}"),
        );
    }
    // And it writes on.
    ok(&mut c, "DISK 0 WRITE 130000 64 77");
    ok(&mut c, "DISK 0 FLUSH");
    ok(&mut c, "DISK 0 VERIFY 130000 64 77");
    drop(c);
    assert_eq!(dst.ask(WorkerOp::TurnOff), WorkerReply::Ok);
    let (_, exit) = dst.wait_exit();
    assert_eq!(exit.unwrap().reason, WorkerExitReason::TurnedOff);

    clean(disk);
    if let Some(parent) = parent {
        clean(parent);
        let (lba, count, seed) = PARENT;
        let v = Vhdx::open(parent, &OpenOptions::read_only()).unwrap();
        let mut buf = vec![0u8; (count * 512) as usize];
        v.read_at(&mut buf, lba * 512).unwrap();
        assert_eq!(
            pattern::verify(&buf, seed, lba * 512),
            None,
            "the parent changed"
        );
    }
    host_verifies(disk, &acked);
    // Free once both workers are gone: nothing was left holding it.
    drop(Vhdx::open(disk, &OpenOptions::default()).unwrap());
}

#[test]
fn kvm_migrate_dynamic_vhdx_while_the_guest_writes() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.vhdx");
    dynamic(&disk);
    migrate_while_writing(&disk, None);
}

#[test]
fn kvm_migrate_differencing_vhdx_on_a_shared_parent_while_the_guest_writes() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = differencing(dir.path());
    migrate_while_writing(&child, Some(&base));
}

#[test]
fn kvm_migrate_vhdx_destination_killed_mid_copy_keeps_the_vm_on_the_source() {
    if !kvm() {
        return;
    }
    let (a, b) = pair();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.vhdx");
    dynamic(&disk);
    let (mut src, mut c, sum) = source(&disk);
    let session = uuid::Uuid::new_v4();
    let mut dst = incoming(vm_spec(&disk), &b, session, 1);
    let to = listening(&dst);
    // 1 MiB/s: the first pass of 64 MiB is still running when the destination dies.
    migrate_out(&src, to, session, &a, 1, CompressMode::None, Some(1 << 20));
    wait_status(&src, "pre-copy moving", |p| {
        p.state == MigrateState::Precopy && p.transferred_bytes > 0
    });
    let during = ok(&mut c, &format!("DISK 0 WRITE {FIRST_LOOP_LBA} 64 21"));
    dst.signal(libc::SIGKILL);
    dst.wait_exit();
    let p = wait_status(&src, "failed", |p| p.state == MigrateState::Failed);
    eprintln!("after the destination was killed: {:?}", p.message);

    let WorkerReply::Status(st) = src.ask(WorkerOp::Status) else {
        panic!("no status")
    };
    assert!(st.running && !st.paused, "{st:?}");
    assert_eq!(during, "OK");
    ok(&mut c, "DIRTY STOP");
    assert_eq!(ok(&mut c, "MEM SUM 40 8"), sum);
    let (lba, count, seed) = EARLY;
    ok(&mut c, &format!("DISK 0 VERIFY {lba} {count} {seed}"));
    ok(&mut c, &format!("DISK 0 VERIFY {FIRST_LOOP_LBA} 64 21"));
    // The source still owns its disk: it writes, and nobody else may open it.
    ok(&mut c, "DISK 0 WRITE 20000 64 22");
    ok(&mut c, "DISK 0 FLUSH");
    assert!(matches!(
        Vhdx::open(&disk, &OpenOptions::default()),
        Err(VhdxError::Locked { .. })
    ));
    assert_eq!(status(&src).state, MigrateState::Failed);
    drop(c);
    assert_eq!(src.ask(WorkerOp::TurnOff), WorkerReply::Ok);
    let (_, exit) = src.wait_exit();
    assert_eq!(exit.unwrap().reason, WorkerExitReason::TurnedOff);
    clean(&disk);
    host_verifies(&disk, &[(FIRST_LOOP_LBA, 21), (20000, 22)]);
}
