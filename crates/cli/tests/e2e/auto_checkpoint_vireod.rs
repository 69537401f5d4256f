//! Automatic checkpoints (`--auto-checkpoint on`) against a real vireod: taken before apply,
//! `vm set` of hardware and a disk resize; applying one brings the data of before back;
//! retention deletes the oldest automatic ones only; off takes none; a checkpoint that cannot
//! be taken (a raw disk) blocks the operation. Off VMs need no KVM; the running VM's live
//! automatic checkpoint is the last test.

use crate::vireod_harness;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vireo_api::{Checkpoint, Job, JobState};
use vireo_block::BlockBackend;
use vireod_harness::Daemon;

const MIB: u64 = 1 << 20;

fn vhdx(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let opts = vireo_vhdx::CreateOptions {
        size: 8 * MIB,
        block_size: MIB as u32,
        ..Default::default()
    };
    drop(vireo_vhdx::Vhdx::create(&p, &opts).unwrap());
    p
}

/// The VM's disk 0 as the VM would see it now (its current file and the chain below).
fn open_disk(d: &Daemon, vm: &str) -> vireo_vhdx::Vhdx {
    let path = d.vm(vm).spec.disks[0].path.clone();
    vireo_vhdx::Vhdx::open(&path, &vireo_vhdx::OpenOptions::default()).unwrap()
}

/// Disk 0 of a `saved` VM, read-only and without a lock: vireod holds a saved VM's disk locks
/// until its restore (docs/vm-state.md, "Disk locks across a save").
fn peek_disk(d: &Daemon, vm: &str) -> vireo_vhdx::Vhdx {
    let path = d.vm(vm).spec.disks[0].path.clone();
    let opts = vireo_vhdx::OpenOptions {
        no_lock: true,
        ..vireo_vhdx::OpenOptions::read_only()
    };
    vireo_vhdx::Vhdx::open(&path, &opts).unwrap()
}

fn write(d: &Daemon, vm: &str, at: u64, byte: u8) {
    let disk = open_disk(d, vm);
    disk.write(&[byte; 4096], at).unwrap();
    disk.flush().unwrap();
}

fn byte_at(d: &Daemon, vm: &str, at: u64) -> u8 {
    let mut buf = [0u8; 4096];
    open_disk(d, vm).read(&mut buf, at).unwrap();
    assert!(buf.iter().all(|&b| b == buf[0]), "mixed data at {at}");
    buf[0]
}

fn checkpoints(d: &Daemon, vm: &str) -> Vec<Checkpoint> {
    serde_json::from_str(&d.ok(&["checkpoint", "list", vm, "--output", "json"])).unwrap()
}

fn automatic(d: &Daemon, vm: &str) -> Vec<Checkpoint> {
    checkpoints(d, vm)
        .into_iter()
        .filter(|c| c.automatic)
        .collect()
}

/// Waits until no job of the VM runs (retention deletes in a job after the operation).
fn idle(d: &Daemon, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs: Vec<Job> =
            serde_json::from_str(&d.ok(&["job", "list", "--vm", vm, "--output", "json"])).unwrap();
        if jobs.iter().all(|j| j.state != JobState::Running) {
            assert!(
                jobs.iter().all(|j| j.state == JobState::Completed),
                "{jobs:?}"
            );
            return;
        }
        assert!(Instant::now() < deadline, "jobs still running: {jobs:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn create(d: &Daemon, vm: &str, disk: &Path, extra: &[&str]) {
    let kernel = vireo_probe_image::probe_elf();
    let mut args = vec![
        "vm",
        "create",
        vm,
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32M",
        "--disk",
        disk.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    d.ok(&args);
}

#[test]
fn apply_and_resize_are_checkpointed_first_and_the_checkpoint_brings_the_data_back() {
    let Some(d) = Daemon::start() else { return };
    let disk = vhdx(d.dir.path(), "a.vhdx");
    create(&d, "a", &disk, &["--auto-checkpoint", "on"]);
    let show = d.ok(&["vm", "show", "a"]);
    assert!(
        show.contains("checkpoints:   automatic on, before risky operations (the newest 3 kept)"),
        "{show}"
    );
    write(&d, "a", 0, 0xA1);
    d.ok(&["checkpoint", "create", "a", "base"]);
    write(&d, "a", 0, 0xB2);

    // Apply: the state it discards is kept in an automatic checkpoint first.
    d.ok(&["checkpoint", "apply", "a", "base"]);
    assert_eq!(byte_at(&d, "a", 0), 0xA1);
    let autos = automatic(&d, "a");
    assert_eq!(autos.len(), 1, "{autos:?}");
    assert!(
        autos[0].name.starts_with("auto-apply-"),
        "{}",
        autos[0].name
    );
    let tree = d.ok(&["checkpoint", "list", "a"]);
    assert!(tree.contains(", automatic)"), "{tree}");
    let base_line = tree
        .lines()
        .find(|l| l.trim_start().starts_with("base  ("))
        .unwrap();
    assert!(!base_line.contains("automatic"), "{tree}");
    d.ok(&["checkpoint", "apply", "a", &autos[0].name]);
    assert_eq!(byte_at(&d, "a", 0), 0xB2, "the automatic checkpoint kept B");
    idle(&d, "a");

    // Resize (a forced shrink drops the data past 4 MiB): the checkpoint keeps it.
    write(&d, "a", 7 * MIB, 0xC3);
    let out = d.ok(&["vm", "disk", "resize", "a", "0", "--size", "4M", "--force"]);
    assert!(
        out.contains(
            "resized disk 0 of VM a to 4194304 bytes (automatic checkpoint auto-disk-resize-"
        ),
        "{out}"
    );
    assert_eq!(open_disk(&d, "a").size(), 4 * MIB);
    let resize_cp = automatic(&d, "a")
        .into_iter()
        .find(|c| c.name.starts_with("auto-disk-resize-"))
        .expect("an automatic checkpoint of the resize");
    idle(&d, "a");
    d.ok(&["checkpoint", "apply", "a", &resize_cp.name]);
    assert_eq!(open_disk(&d, "a").size(), 8 * MIB);
    assert_eq!(byte_at(&d, "a", 7 * MIB), 0xC3);
    assert_eq!(byte_at(&d, "a", 0), 0xB2);
    idle(&d, "a");
    // The user's checkpoint is still there after all of it; the chain is sound.
    assert!(checkpoints(&d, "a")
        .iter()
        .any(|c| c.name == "base" && !c.automatic));
    let vm_disk = d.vm("a").spec.disks[0].path.clone();
    let report = vireo_vhdx::Vhdx::check(&vm_disk, false).unwrap();
    assert!(report.clean, "{:?}", report.problems);
}

#[test]
fn retention_deletes_the_oldest_automatic_checkpoints_only() {
    let Some(d) = Daemon::start() else { return };
    let disk = vhdx(d.dir.path(), "r.vhdx");
    create(
        &d,
        "r",
        &disk,
        &["--auto-checkpoint", "on", "--auto-checkpoint-keep", "2"],
    );
    d.ok(&["checkpoint", "create", "r", "mine"]);
    let mut names = Vec::new();
    let mut memory_before = 32 * MIB;
    for (i, mem) in ["48M", "64M", "32M", "48M"].iter().enumerate() {
        write(&d, "r", 0, 0x10 + i as u8);
        d.ok(&["vm", "set", "r", "--memory", mem]);
        idle(&d, "r");
        let autos = automatic(&d, "r");
        let newest = autos.iter().max_by_key(|c| c.created_at).unwrap();
        assert!(newest.name.starts_with("auto-set-"), "{}", newest.name);
        // The checkpoint keeps the memory of before; the VM has the new one, on its new
        // differencing child (not on the frozen file).
        assert_eq!(newest.spec.memory_bytes, memory_before);
        let vm = d.vm("r");
        memory_before = vm.spec.memory_bytes;
        assert_eq!(
            memory_before >> 20,
            mem.trim_end_matches('M').parse::<u64>().unwrap()
        );
        assert_ne!(vm.spec.disks[0].path, newest.disks[0].frozen);
        names.push(newest.name.clone());
        assert_eq!(autos.len(), (i + 1).min(2), "{autos:?}");
    }
    let left: Vec<String> = automatic(&d, "r").into_iter().map(|c| c.name).collect();
    assert_eq!(left, names[2..].to_vec(), "the two newest stay");
    assert!(checkpoints(&d, "r").iter().any(|c| c.name == "mine"));
    // The data the VM wrote last is its own; the newest automatic checkpoint has the one
    // before it.
    assert_eq!(byte_at(&d, "r", 0), 0x13);
    // Off now, so the applies below take no checkpoint (and retention deletes none).
    d.ok(&["vm", "set", "r", "--auto-checkpoint", "off"]);
    d.ok(&["checkpoint", "apply", "r", &names[3]]);
    assert_eq!(byte_at(&d, "r", 0), 0x13);
    d.ok(&["checkpoint", "apply", "r", &names[2]]);
    assert_eq!(byte_at(&d, "r", 0), 0x12);
    assert_eq!(
        d.vm("r").spec.memory_bytes,
        64 * MIB,
        "the spec of before the set"
    );
}

#[test]
fn with_the_option_off_nothing_is_taken() {
    let Some(d) = Daemon::start() else { return };
    let disk = vhdx(d.dir.path(), "o.vhdx");
    create(&d, "o", &disk, &[]);
    assert!(d
        .ok(&["vm", "show", "o"])
        .contains("checkpoints:   automatic off\n"));
    d.ok(&["checkpoint", "create", "o", "mine"]);
    d.ok(&["vm", "set", "o", "--memory", "64M"]);
    d.ok(&["vm", "disk", "resize", "o", "0", "--size", "16M"]);
    d.ok(&["checkpoint", "apply", "o", "mine"]);
    idle(&d, "o");
    let cps = checkpoints(&d, "o");
    assert_eq!(cps.len(), 1, "{cps:?}");
    assert!(!cps[0].automatic);
}

#[test]
fn a_checkpoint_that_cannot_be_taken_blocks_the_operation() {
    let Some(d) = Daemon::start() else { return };
    let raw = d.dir.path().join("raw.img");
    std::fs::write(&raw, vec![0x5a; 2 * MIB as usize]).unwrap();
    create(&d, "w", &raw, &["--auto-checkpoint", "on"]);
    let (_, line) = d.fails(&["vm", "disk", "resize", "w", "0", "--size", "1M", "--force"]);
    for part in [
        "automatic checkpoint of VM \"w\" before disk-resize failed",
        "is not a VHDX image",
        "the disk was not resized",
        "vireo vm set w --auto-checkpoint off",
    ] {
        assert!(line.contains(part), "{part:?} not in {line}");
    }
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 2 * MIB);
    let (_, line) = d.fails(&["vm", "set", "w", "--memory", "64M"]);
    assert!(
        line.contains("before set failed") && line.contains("was not changed"),
        "{line}"
    );
    assert_eq!(d.vm("w").spec.memory_bytes, 32 * MIB);
    assert!(checkpoints(&d, "w").is_empty());
    // Turned off, the same operation goes through (and its value is checked).
    d.ok(&["vm", "set", "w", "--auto-checkpoint", "off"]);
    let (code, line) = d.fails(&["vm", "set", "w", "--auto-checkpoint-keep", "0"]);
    assert!(
        line.contains("auto_checkpoint.keep") && line.contains("1 to 64"),
        "{code} {line}"
    );
    d.ok(&["vm", "disk", "resize", "w", "0", "--size", "1M", "--force"]);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), MIB);
}

#[test]
fn a_running_vm_is_checkpointed_live_before_a_resize() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(d) = Daemon::start() else { return };
    let disk = vhdx(d.dir.path(), "live.vhdx");
    create(
        &d,
        "l",
        &disk,
        &["--shutdown-line", "POWEROFF", "--auto-checkpoint", "off"],
    );
    d.ok(&["vm", "start", "l"]);
    let pid = d.worker_pid("l");
    // The setting alone may change while the VM runs.
    d.ok(&["vm", "set", "l", "--auto-checkpoint", "on"]);
    let out = d.ok(&["vm", "disk", "resize", "l", "0", "--size", "16M"]);
    assert!(
        out.contains("to 16777216 bytes (automatic checkpoint auto-disk-resize-"),
        "{out}"
    );
    assert_eq!(d.worker_pid("l"), pid, "the VM kept its worker");
    assert_eq!(d.vm("l").state.name(), "running");
    let autos = automatic(&d, "l");
    assert_eq!(autos.len(), 1);
    assert!(autos[0].has_state, "a live checkpoint keeps the VM's state");
    assert!(
        autos[0].capture.as_ref().is_some_and(|c| c.live),
        "{:?}",
        autos[0].capture
    );
    d.ok(&["vm", "turn-off", "l"]);
    d.ok(&["checkpoint", "apply", "l", &autos[0].name]);
    assert_eq!(d.vm("l").state.name(), "saved");
    assert_eq!(
        peek_disk(&d, "l").size(),
        8 * MIB,
        "the size of before the resize"
    );
}
