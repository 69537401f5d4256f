//! `vireo vm move-storage` of a *running* probe VM with two checkpoints, through vireod
//! (docs/storage-migration.md, "A VM with checkpoints"). Before, such a move was refused
//! ("turn it off"). Now the frozen files are copied by vireod, the running top by the worker's
//! live copy, and one commit moves the records: the same worker carries on, every write the
//! guest made during the move is there, the checkpoint list is unchanged, nothing is left in
//! the old places, applying the first checkpoint gives back its memory and disk, and its new
//! files go beside the moved ones. A checkpoint operation during the move is refused. vireod
//! killed at the new fault points leaves one whole layout, settled at its next start.

use std::time::{Duration, Instant};

use crate::vireod_harness;
use vireo_api::{Job, JobState};
use vireod_harness::console::Console;
use vireod_harness::live_move::{
    base_disk, daemon_with_two_checkpoints, die_during_move, running_with_two_checkpoints,
};
use vireod_harness::tree::{all_check_clean, files_in_use, vhdx_on_disk};
use vireod_harness::Daemon;

fn job_id(no_wait_output: &str) -> String {
    no_wait_output
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no job id in {no_wait_output:?}"))
        .to_owned()
}

fn job(d: &Daemon, id: &str) -> Job {
    serde_json::from_str(&d.ok(&["job", "show", id, "--output", "json"])).unwrap()
}

#[test]
fn a_running_vm_moves_with_its_checkpoints() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(d) = Daemon::start() else { return };
    base_disk(d.dir.path());
    let (mut c, sum) = running_with_two_checkpoints(&d);
    let pid = d.worker_pid("r");
    let tree = d.ok(&["checkpoint", "list", "r"]);
    let before = files_in_use(&d, "r");
    assert_eq!(before.len(), 3, "{before:?}");

    let to = d.dir.path().join("moved");
    let out = d.ok(&[
        "vm",
        "move-storage",
        "r",
        "--to",
        to.to_str().unwrap(),
        "--no-wait",
    ]);
    let id = job_id(&out);
    // The move's intent is recorded before its job exists: refused at once, not queued.
    let (code, line) = d.fails(&["checkpoint", "create", "r", "during"]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("moving its storage"), "{line}");
    // The guest writes on while the move runs, each write a new pattern in a new place.
    let mut written = Vec::new();
    let mut during = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let state = job(&d, &id).state;
        if state != JobState::Running {
            assert_eq!(state, JobState::Completed, "{:?}", job(&d, &id).error);
            break;
        }
        assert!(Instant::now() < deadline, "the move did not end");
        let n = written.len() as u64;
        // Sectors 256.. (past the checkpoints' writes), 16 sectors each, wrapping in 1 MiB.
        let (lba, seed) = (256 + (n * 16) % 1792, 20 + n % 200);
        c.ok(&format!("DISK 0 WRITE {lba} 16 {seed}"));
        written.retain(|&(l, _)| l != lba);
        written.push((lba, seed));
        during += 1;
    }
    eprintln!("guest writes during the move: {during}");
    assert!(during > 0, "no guest write happened during the move");
    assert_eq!(d.worker_pid("r"), pid, "the move must keep the worker");
    c.ok("DISK 0 VERIFY 0 64 5");
    c.ok("DISK 0 VERIFY 64 64 6");
    c.ok("DISK 0 VERIFY 128 64 7");
    for (lba, seed) in &written {
        c.ok(&format!("DISK 0 VERIFY {lba} 16 {seed}"));
    }
    assert_eq!(d.ok(&["checkpoint", "list", "r"]), tree, "the tree changed");
    let to = std::fs::canonicalize(&to).unwrap();
    let moved = files_in_use(&d, "r");
    assert_eq!(moved.len(), before.len(), "{moved:?}");
    assert!(moved.iter().all(|f| f.starts_with(&to)), "{moved:?}");
    // Every VHDX anywhere (the state folder included) is one the tree names.
    assert_eq!(vhdx_on_disk(d.dir.path()), moved, "files left behind");
    drop(c);

    d.ok(&["vm", "turn-off", "r"]);
    all_check_clean(&d, &moved);
    d.ok(&["checkpoint", "apply", "r", "first"]);
    // The new child went beside the moved files, not into the VM's folder.
    let disk = d.vm("r").spec.disks[0].path.clone();
    assert!(disk.starts_with(&to), "{}", disk.display());
    d.ok(&["vm", "start", "r"]);
    let mut c = Console::attach(&d, "r");
    c.ok("DISK 0 VERIFY 0 64 5");
    assert!(c.ask("DISK 0 VERIFY 64 64 6").starts_with("ERR"));
    assert_eq!(c.ok("MEM SUM 16 8"), sum);
    drop(c);
    d.ok(&["vm", "turn-off", "r"]);
    assert_eq!(vhdx_on_disk(d.dir.path()), files_in_use(&d, "r"));
    all_check_clean(&d, &files_in_use(&d, "r"));
}

#[test]
fn a_running_vms_move_cut_short_leaves_one_whole_layout() {
    let Some(mut d) = daemon_with_two_checkpoints() else {
        return;
    };
    let pid = d.worker_pid("r");
    let tree = d.ok(&["checkpoint", "list", "r"]);
    let old = files_in_use(&d, "r");
    // Frozen files copied, the worker not yet asked: the copies go, the VM stays.
    let first = d.dir.path().join("first");
    die_during_move(&mut d, "move-copied", &first);
    assert_eq!(files_in_use(&d, "r"), old, "rolled back");
    assert_eq!(vhdx_on_disk(d.dir.path()), old, "copies left behind");
    // The worker switched, nothing recorded: the move is recorded at the restart.
    let second = d.dir.path().join("second");
    die_during_move(&mut d, "move-switched", &second);
    let second = std::fs::canonicalize(&second).unwrap();
    let moved = files_in_use(&d, "r");
    assert!(moved.iter().all(|f| f.starts_with(&second)), "{moved:?}");
    assert_eq!(vhdx_on_disk(d.dir.path()), moved, "old files left behind");
    assert_eq!(d.ok(&["checkpoint", "list", "r"]), tree);
    assert_eq!(d.worker_pid("r"), pid);
    let mut c = Console::attach(&d, "r");
    c.ok("DISK 0 VERIFY 0 64 5");
    c.ok("DISK 0 VERIFY 128 64 7");
    c.ok("DISK 0 WRITE 192 64 8");
    // The console runs through vireod: attached again after its restart.
    drop(c);
    // Recorded, old files still there: the restart deletes them.
    let third = d.dir.path().join("third");
    die_during_move(&mut d, "move-commit", &third);
    let third = std::fs::canonicalize(&third).unwrap();
    let moved = files_in_use(&d, "r");
    assert!(moved.iter().all(|f| f.starts_with(&third)), "{moved:?}");
    assert_eq!(vhdx_on_disk(d.dir.path()), moved, "old files left behind");
    assert_eq!(d.worker_pid("r"), pid);
    let mut c = Console::attach(&d, "r");
    c.ok("DISK 0 VERIFY 192 64 8");
    drop(c);
    d.ok(&["vm", "turn-off", "r"]);
    all_check_clean(&d, &moved);
    d.ok(&["checkpoint", "apply", "r", "second"]);
    d.ok(&["vm", "start", "r"]);
    let mut c = Console::attach(&d, "r");
    c.ok("DISK 0 VERIFY 64 64 6");
    assert!(c.ask("DISK 0 VERIFY 128 64 7").starts_with("ERR"));
    drop(c);
    d.ok(&["vm", "turn-off", "r"]);
}
