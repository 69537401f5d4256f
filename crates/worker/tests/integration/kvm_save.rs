//! `Save` on worker.sock and a worker started with `restore_from`: the probe guest continues
//! where it stopped (memory pattern intact, its dirty workload still running, no second boot),
//! including a VM whose disk slots had a hot-added disk and a gap left by a removed one.
//! A damaged save is refused at start with a message naming the file, and nothing runs.

use crate::common;

use std::path::Path;

use common::*;
use vireo_api::worker::{WorkerExitReason, WorkerOp, WorkerReply};
use vireo_api::{DiskFormat, DiskSpec};
use vireo_probe_image::ProbeConsole;

fn disk(path: &Path, serial: &str) -> DiskSpec {
    DiskSpec {
        path: path.to_path_buf(),
        read_only: false,
        format: Some(DiskFormat::Raw),
        serial: Some(serial.into()),
        max_iops: None,
        min_iops: None,
        queues: None,
    }
}

fn ok(console: &mut ProbeConsole, cmd: &str) -> String {
    let answer = console
        .command(cmd, T)
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(answer.starts_with("OK"), "{cmd}: {answer}");
    answer
}

#[test]
fn save_and_restore_with_a_hot_added_disk_and_an_empty_slot_between() {
    if !kvm() {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let a = raw_disk(files.path(), "a.img", 4 << 20);
    let b = raw_disk(files.path(), "b.img", 4 << 20);
    let c = raw_disk(files.path(), "c.img", 4 << 20);
    let mut spec = probe_spec();
    spec.disks = vec![disk(&a, "A"), disk(&b, "B")];
    let w = Worker::start(spec.clone());
    w.wait_console("PROBE READY");
    let mut console = w.probe_console();
    // Slots: A, B, then C hot-added into slot 2; B removed leaves slot 1 empty.
    assert!(matches!(
        w.ask(WorkerOp::AddDisk {
            disk: disk(&c, "C")
        }),
        WorkerReply::DiskAdded { index: 2 }
    ));
    assert_eq!(
        w.ask(WorkerOp::RemoveDisk { serial: "B".into() }),
        WorkerReply::Ok
    );
    assert!(ok(&mut console, "RESCAN").contains("disks=2"));
    ok(&mut console, "DISK 0 WRITE 0 64 11");
    ok(&mut console, "DISK 1 WRITE 8 64 33");
    ok(&mut console, "MEM FILL 16 8 77");
    ok(&mut console, "DIRTY START 8 4 0");
    drop(console);

    let saved = files.path().join("saved");
    let mut w = w;
    assert_eq!(
        w.ask(WorkerOp::Save {
            dir: Some(saved.clone()),
            hand_over_disks: false,
        }),
        WorkerReply::Ok
    );
    let (code, exit) = w.wait_exit();
    assert_eq!(code, Some(0), "log:\n{}", w.log());
    assert_eq!(
        exit.expect("exit.json").reason,
        WorkerExitReason::Saved { dir: saved.clone() }
    );
    assert!(saved.join("vm.state").is_file() && saved.join("memory.bin").is_file());

    // The owner's spec at save time: A and C, in slot order.
    spec.disks = vec![disk(&a, "A"), disk(&c, "C")];
    let r = Worker::launch(w.vm_id, spec, vec![], Some(saved.clone()));
    let mut console = r.probe_console();
    let passes = ok(&mut console, "DIRTY STOP");
    // The workload started before the save ran on: a rebooted probe has none to stop.
    assert!(passes.contains("passes="), "{passes}");
    ok(&mut console, "MEM VERIFY 16 8 77");
    ok(&mut console, "DISK 0 VERIFY 0 64 11");
    ok(&mut console, "DISK 1 VERIFY 8 64 33");
    assert!(ok(&mut console, "DISK 1 ID").contains("C"));
    // The empty slot is still free for a hot add, and the guest's disk count is unchanged.
    assert!(ok(&mut console, "INFO").contains(" disks=2 "));
    assert!(matches!(
        r.ask(WorkerOp::AddDisk {
            disk: disk(&b, "B")
        }),
        WorkerReply::DiskAdded { index: 1 }
    ));
    let log = r.wait_console("OK");
    assert!(
        !log.contains("PROBE READY"),
        "the guest booted again: {log}"
    );
}

#[test]
fn a_damaged_save_is_refused_at_start_and_nothing_runs() {
    if !kvm() {
        return;
    }
    let mut w = Worker::start(probe_spec());
    w.wait_console("PROBE READY");
    let files = tempfile::tempdir().unwrap();
    let saved = files.path().join("saved");
    assert_eq!(
        w.ask(WorkerOp::Save {
            dir: Some(saved.clone()),
            hand_over_disks: false,
        }),
        WorkerReply::Ok
    );
    w.wait_exit();
    let state = saved.join("vm.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0x55;
    std::fs::write(&state, &bytes).unwrap();
    let mut r = Worker::launch(w.vm_id, probe_spec(), vec![], Some(saved.clone()));
    let (code, exit) = r.wait_exit();
    assert_eq!(code, Some(1));
    let WorkerExitReason::StartFailed { message } = exit.expect("exit.json").reason else {
        panic!("not a start failure")
    };
    assert!(message.contains(&state.display().to_string()), "{message}");
    // The save is left as it was for the owner to decide.
    assert_eq!(std::fs::read(&state).unwrap(), bytes);
}

#[test]
fn save_of_a_relative_dir_is_refused_and_the_vm_runs_on() {
    if !kvm() {
        return;
    }
    let w = Worker::start(probe_spec());
    w.wait_console("PROBE READY");
    let WorkerReply::Error { message } = w.ask(WorkerOp::Save {
        dir: Some("rel/dir".into()),
        hand_over_disks: false,
    }) else {
        panic!("a relative save dir was accepted")
    };
    assert!(message.contains("rel/dir"), "{message}");
    let mut console = w.probe_console();
    ok(&mut console, "PING");
}
