//! A running VM's storage move cut short with *both* vireod and the worker gone
//! (docs/storage-migration.md, "Failure safety"): vireod dies at a fault point of the move,
//! the guest writes on through the worker's own console, then the worker is killed. Before,
//! the restart could not ask the worker and kept the old layout: every write after the switch
//! was lost (or, without checkpoints, the spec named old files the worker had deleted). Now
//! the worker's switch record decides: switched → the copies with those writes are the VM's
//! disks; never switched → the old layout, with the writes made on it.

use std::path::Path;

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::live_move::{
    daemon_with_two_checkpoints, die_at, kill9_unrelated, restart_settled, vm_dir, WorkerConsole,
};
use vireod_harness::tree::{all_check_clean, files_in_use, vhdx_on_disk};
use vireod_harness::Daemon;

const RECORD: &str = "storage-switch.json";

/// vireod dies at `point` of the move of VM `name` to `to`; with vireod down the guest writes
/// `writes` through the worker's console and flushes them, then the worker is killed; vireod
/// starts again. The flush is the guest's part: like a disk's write cache, a VHDX keeps new
/// block allocations in memory until a flush, so an unflushed write may die with a SIGKILL
/// whether or not a move ran.
fn both_die(d: &mut Daemon, name: &str, point: &str, to: &Path, writes: &[&str]) {
    let pid = d.worker_pid(name);
    let dir = vm_dir(d, name);
    die_at(d, name, point, to);
    let mut w = WorkerConsole::attach(&dir);
    for cmd in writes {
        w.ok(cmd);
    }
    w.ok("DISK 0 FLUSH");
    drop(w);
    kill9_unrelated(pid);
    restart_settled(d, name);
    assert!(
        !dir.join(RECORD).exists(),
        "the switch record outlived the restart"
    );
}

/// Starts the VM again and checks every pattern in `verify`.
fn start_and_verify(d: &Daemon, name: &str, verify: &[&str]) {
    d.ok(&["vm", "start", name]);
    let mut c = Console::attach(d, name);
    for cmd in verify {
        c.ok(cmd);
    }
    drop(c);
    d.ok(&["vm", "turn-off", name]);
}

#[test]
fn a_checkpointed_move_keeps_the_writes_after_the_switch_when_both_die() {
    let Some(mut d) = daemon_with_two_checkpoints() else {
        return;
    };
    let tree = d.ok(&["checkpoint", "list", "r"]);
    let to = d.dir.path().join("moved");
    // The worker is on the copies, nothing recorded by vireod; the guest writes there.
    both_die(
        &mut d,
        "r",
        "move-switched",
        &to,
        &["DISK 0 WRITE 192 64 8", "DISK 0 WRITE 2048 16 9"],
    );
    let to = std::fs::canonicalize(&to).unwrap();
    let moved = files_in_use(&d, "r");
    assert!(moved.iter().all(|f| f.starts_with(&to)), "{moved:?}");
    assert_eq!(vhdx_on_disk(d.dir.path()), moved, "old files left behind");
    assert_eq!(d.ok(&["checkpoint", "list", "r"]), tree);
    start_and_verify(
        &d,
        "r",
        &[
            "DISK 0 VERIFY 0 64 5",
            "DISK 0 VERIFY 128 64 7",
            "DISK 0 VERIFY 192 64 8",
            "DISK 0 VERIFY 2048 16 9",
        ],
    );
    all_check_clean(&d, &moved);
    // The moved tree still applies.
    d.ok(&["checkpoint", "apply", "r", "second"]);
    start_and_verify(&d, "r", &["DISK 0 VERIFY 64 64 6"]);
}

#[test]
fn a_checkpointed_move_that_never_switched_keeps_the_old_layout_when_both_die() {
    let Some(mut d) = daemon_with_two_checkpoints() else {
        return;
    };
    let old = files_in_use(&d, "r");
    let to = d.dir.path().join("moved");
    // Frozen copies made, the worker never asked: it writes on its old files.
    both_die(&mut d, "r", "move-copied", &to, &["DISK 0 WRITE 192 64 8"]);
    assert_eq!(files_in_use(&d, "r"), old, "rolled back");
    assert_eq!(vhdx_on_disk(d.dir.path()), old, "copies left behind");
    start_and_verify(
        &d,
        "r",
        &["DISK 0 VERIFY 128 64 7", "DISK 0 VERIFY 192 64 8"],
    );
    all_check_clean(&d, &old);
}

#[test]
fn a_plain_move_keeps_the_writes_after_the_switch_when_both_die() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(mut d) = Daemon::start() else { return };
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    d.ok(&["disk", "create", "p.vhdx", "--size", "64M"]);
    d.ok(&[
        "vm", "create", "p", "--kernel", &kernel, "--memory", "32M", "--disk", "p.vhdx",
    ]);
    d.ok(&["vm", "start", "p"]);
    let mut c = Console::attach(&d, "p");
    c.ok("DISK 0 WRITE 0 64 5");
    drop(c);
    let old = d.vm("p").spec.disks[0].path.clone();
    let to = d.dir.path().join("moved");
    both_die(&mut d, "p", "move-switched", &to, &["DISK 0 WRITE 64 64 6"]);
    let to = std::fs::canonicalize(&to).unwrap();
    let disk = d.vm("p").spec.disks[0].path.clone();
    assert_eq!(disk, to.join("p.vhdx"), "the spec took the copy");
    assert!(!old.exists(), "the old file stays behind");
    start_and_verify(&d, "p", &["DISK 0 VERIFY 0 64 5", "DISK 0 VERIFY 64 64 6"]);
}
