//! End to end, under KVM and as root: a save and a live checkpoint of a running probe-guest VM
//! that run out of space (its `saved/` and `checkpoints/` folders are 16 MiB tmpfs mounts, the
//! guest holds 64 MiB of data) fail with one line saying so, and leave the VM as it was:
//! running in the same worker, its memory and workload intact, no checkpoint recorded, no
//! differencing child left and its disk still the one it ran on, nothing left in either folder.
//! With the space back, the same VM saves and restores with the same memory.

use std::path::Path;

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::tmpfs::Tmpfs;
use vireod_harness::Daemon;

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The guest is alive and its dirty workload ran on: it made passes since it was started, and
/// it is started again.
fn workload_ran(c: &mut Console) {
    let stop = c.ok("DIRTY STOP");
    let passes: u64 = stop
        .split_whitespace()
        .find_map(|w| w.strip_prefix("passes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pass count in {stop:?}"));
    assert!(passes > 0, "the dirty workload made no pass: {stop}");
    c.ok("DIRTY START 8 4 0");
}

#[test]
fn a_save_or_checkpoint_out_of_space_fails_clearly_and_the_vm_runs_on() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm)
        || !vireo_testkit::require(vireo_testkit::Need::Root)
    {
        return;
    }
    let Some(d) = Daemon::start() else { return };
    let disk = d.dir.path().join("f.vhdx");
    d.ok(&["disk", "create", disk.to_str().unwrap(), "--size", "64M"]);
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    d.ok(&[
        "vm", "create", "f", "--kernel", &kernel, "--memory", "128M", "--disk", "f.vhdx",
    ]);
    let id = d.vm("f").identity.id.to_string();
    let vm_dir = d.dir.path().join("state/vms").join(&id);
    let (saved, checkpoints) = (vm_dir.join("saved"), vm_dir.join("checkpoints"));
    let Some(saved_fs) = Tmpfs::mount(&saved, "16M") else {
        panic!("mounting a tmpfs failed although running as root");
    };
    let checkpoints_fs = Tmpfs::mount(&checkpoints, "16M").expect("second tmpfs");

    d.ok(&["vm", "start", "f"]);
    let pid = d.worker_pid("f");
    let mut c = Console::attach(&d, "f");
    c.ok("DISK 0 WRITE 0 64 5");
    c.ok("MEM FILL 16 64 9");
    let sum = c.ok("MEM SUM 16 64");
    c.ok("DIRTY START 8 4 0");

    let (code, line) = d.fails(&["vm", "save", "f"]);
    eprintln!("save out of space: {line}");
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("space"), "the error should say why: {line}");
    assert_eq!(d.vm("f").state.name(), "running", "after the failed save");
    assert_eq!(
        d.worker_pid("f"),
        pid,
        "the save must not replace the worker"
    );
    workload_ran(&mut c);
    assert_eq!(c.ok("MEM SUM 16 64"), sum);
    assert!(
        !saved.join("vm.state").exists(),
        "a failed save left a state file: {:?}",
        entries(&saved)
    );

    let (code, line) = d.fails(&["checkpoint", "create", "f", "full"]);
    eprintln!("checkpoint out of space: {line}");
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("space"), "the error should say why: {line}");
    assert_eq!(
        d.vm("f").state.name(),
        "running",
        "after the failed checkpoint"
    );
    assert_eq!(d.worker_pid("f"), pid);
    workload_ran(&mut c);
    assert_eq!(c.ok("MEM SUM 16 64"), sum);
    let list = d.ok(&["checkpoint", "list", "f", "--output", "json"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    assert_eq!(d.vm("f").spec.disks[0].path, disk);
    let mut files = entries(d.dir.path());
    files.retain(|f| f.contains("vhdx"));
    assert_eq!(files, ["f.vhdx"], "a differencing child was left behind");
    assert!(
        entries(&checkpoints).is_empty(),
        "{:?}",
        entries(&checkpoints)
    );
    // The guest's disk writes are where they were.
    c.ok("DISK 0 VERIFY 0 64 5");
    drop(c);

    // With room again the same VM saves and comes back whole.
    drop(saved_fs);
    drop(checkpoints_fs);
    d.ok(&["vm", "save", "f"]);
    assert_eq!(d.vm("f").state.name(), "saved");
    d.ok(&["vm", "start", "f"]);
    let mut c = Console::attach(&d, "f");
    workload_ran(&mut c);
    assert_eq!(c.ok("MEM SUM 16 64"), sum);
    c.ok("DISK 0 VERIFY 0 64 5");
    drop(c);
    d.ok(&["vm", "turn-off", "f"]);
    d.ok(&["disk", "check", disk.to_str().unwrap()]);
}
