//! End to end, the proof for export/import/clone (docs/export.md) with probe-guest VMs
//! through a real vireod and its `vireo-vm` workers: a VM on a differencing VHDX writes a disk
//! pattern and is exported (off), imported with `--copy --new-id`, and both VMs run side by side
//! reading the same data, then diverge independently; every copied file passes `vireo disk
//! check`; clones of the running and of the stopped copy run beside it; an import that cannot be done lists every problem and stores
//! nothing; a saved VM exported and imported (moved) continues its workload when started; a
//! running VM with two checkpoints exports its tree, which an import with a new id brings back
//! disk-only and an import that keeps the id brings back whole.

use std::path::Path;

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::tree::checkpoints;
use vireod_harness::two_checkpoints::{
    first_applies, mem_sum, shape, vm_with_two_checkpoints, wait_running,
};
use vireod_harness::Daemon;

fn disk_check(d: &Daemon, dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let out = d.ok(&["disk", "check", p.to_str().unwrap()]);
        assert!(!out.contains("ERROR"), "{}: {out}", p.display());
    }
}

#[test]
fn export_import_new_id_side_by_side_clone_and_a_moved_saved_vm() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(mut d) = Daemon::start() else { return };
    let root = d.dir.path().to_owned();
    let (base, child) = (root.join("base.vhdx"), root.join("a.vhdx"));
    d.ok(&["disk", "create", base.to_str().unwrap(), "--size", "4M"]);
    d.ok(&[
        "disk",
        "create",
        child.to_str().unwrap(),
        "--parent",
        base.to_str().unwrap(),
    ]);
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    d.ok(&[
        "vm", "create", "a", "--kernel", &kernel, "--memory", "32M", "--disk", "a.vhdx",
    ]);
    d.ok(&["vm", "start", "a"]);
    let mut c = Console::attach(&d, "a");
    c.ok("DISK 0 WRITE 0 64 5");
    c.ok("DISK 0 FLUSH");
    drop(c);
    // Running: exported live (a temporary checkpoint, merged back afterwards); it runs on.
    std::fs::create_dir(root.join("exp")).unwrap();
    let pid_before = d.worker_pid("a");
    d.ok(&["vm", "export", "a", "exp"]);
    assert_eq!(d.vm("a").state.name(), "running");
    assert_eq!(
        d.worker_pid("a"),
        pid_before,
        "the worker was not restarted"
    );
    assert_eq!(d.ok(&["checkpoint", "list", "a"]), "no checkpoints\n");
    let folder = root.join("exp").join("a");
    assert!(folder.join("vm.json").is_file());
    disk_check(&d, &folder.join("disks"));

    std::fs::create_dir(root.join("imp")).unwrap();
    let out = d.ok(&[
        "vm", "import", "exp/a", "--copy", "--to", "imp", "--new-id", "--name", "b",
    ]);
    assert!(out.contains("VM b is in the inventory"), "{out}");
    disk_check(&d, &root.join("imp").join("b").join("disks"));
    let (a, b) = (d.vm("a"), d.vm("b"));
    assert_ne!(a.identity.id, b.identity.id);
    assert_ne!(a.identity.disk_serials, b.identity.disk_serials);

    // Side by side (a still running since before its export), the same data; then each its own.
    d.ok(&["vm", "start", "b"]);
    let mut ca = Console::attach(&d, "a");
    let mut cb = Console::attach(&d, "b");
    ca.ok("DISK 0 VERIFY 0 64 5");
    cb.ok("DISK 0 VERIFY 0 64 5");
    cb.ok("DISK 0 WRITE 0 64 7");
    cb.ok("DISK 0 FLUSH");
    ca.ok("DISK 0 VERIFY 0 64 5");
    let id_a = ca.ok("DISK 0 ID");
    let id_b = cb.ok("DISK 0 ID");
    assert_ne!(id_a, id_b, "the copy has its own disk serial");
    drop((ca, cb));

    // The compatibility report: every problem, nothing stored.
    let before = d.ok(&["vm", "list"]);
    let (code, line) = d.fails(&["vm", "import", "exp/a", "--memory", "64G"]);
    assert_ne!(code, 0);
    for fix in ["--name", "--new-id", "--memory"] {
        assert!(line.contains(fix), "{fix}: {line}");
    }
    assert_eq!(d.ok(&["vm", "list"]), before);

    // A clone of the running copy (from a temporary live checkpoint: b keeps its worker and
    // no checkpoint is left), then one of it turned off; each clone runs beside the others
    // with b's data and its own identity.
    let pid_b = d.worker_pid("b");
    d.ok(&["vm", "clone", "b", "c", "--to", "imp"]);
    assert_eq!(d.vm("b").state.name(), "running");
    assert_eq!(d.worker_pid("b"), pid_b, "the worker was not restarted");
    assert_eq!(d.ok(&["checkpoint", "list", "b"]), "no checkpoints\n");
    assert_eq!(
        d.vm("c").state.name(),
        "off",
        "a running VM's memory is not cloned"
    );
    d.ok(&["vm", "turn-off", "b"]);
    d.ok(&["vm", "clone", "b", "c2", "--to", "imp"]);
    for clone in ["c", "c2"] {
        assert_ne!(d.vm(clone).identity.id, d.vm("b").identity.id);
        d.ok(&["vm", "start", clone]);
        let mut cc = Console::attach(&d, clone);
        cc.ok("DISK 0 VERIFY 0 64 7");
        assert_ne!(cc.ok("DISK 0 ID"), id_b, "{clone} has its own disk serial");
        drop(cc);
    }
    let mut cc = Console::attach(&d, "c");
    cc.ok("DISK 0 WRITE 0 64 8");
    cc.ok("DISK 0 FLUSH");
    drop(cc);
    let mut cc2 = Console::attach(&d, "c2");
    cc2.ok("DISK 0 VERIFY 0 64 7");
    drop(cc2);
    d.ok(&["vm", "turn-off", "c"]);
    d.ok(&["vm", "turn-off", "c2"]);

    // A saved VM moves: export, remove, import in place; start continues its workload.
    let mut ca = Console::attach(&d, "a");
    ca.ok("MEM FILL 16 8 9");
    ca.ok("DIRTY START 8 4 0");
    drop(ca);
    d.ok(&["vm", "save", "a"]);
    std::fs::create_dir(root.join("exp2")).unwrap();
    d.ok(&["vm", "export", "a", "exp2"]);
    d.ok(&["vm", "rm", "a"]);
    d.ok(&["vm", "import", "exp2/a"]);
    assert_eq!(d.vm("a").state.name(), "saved");
    d.kill9_and_restart();
    assert_eq!(d.vm("a").state.name(), "saved");
    d.ok(&["vm", "start", "a"]);
    let mut ca = Console::attach(&d, "a");
    let stop = ca.ok("DIRTY STOP");
    assert!(stop.contains("passes="), "{stop}");
    ca.ok("MEM VERIFY 16 8 9");
    ca.ok("DISK 0 VERIFY 0 64 5");
    drop(ca);
    let log = d.ok(&["vm", "console", "a", "--log"]);
    assert!(
        !log.contains("PROBE READY"),
        "the guest booted again: {log}"
    );
}

#[test]
fn a_running_vm_with_two_checkpoints_exports_and_imports_its_tree() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(d) = Daemon::start() else { return };
    let root = d.dir.path().to_owned();
    let (first_sum, now_sum) = vm_with_two_checkpoints(&d);
    let tree = checkpoints(&d, "m");

    // Exported running, through a temporary checkpoint that is gone afterwards and is not in
    // the export.
    std::fs::create_dir(root.join("exp")).unwrap();
    let pid = d.worker_pid("m");
    d.ok(&["vm", "export", "m", "exp"]);
    assert_eq!(d.worker_pid("m"), pid, "the worker was not restarted");
    assert_eq!(shape(&checkpoints(&d, "m")), shape(&tree));
    let folder = root.join("exp").join("m");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("vm.json")).unwrap()).unwrap();
    assert_eq!(manifest["version"], 2);
    assert_eq!(manifest["state"], "saved");
    let names: Vec<&str> = manifest["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["record"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", "second"]);
    let ours = folder
        .join("disks")
        .join(format!("vireo-checkpoints-{}", d.vm("m").id()));
    disk_check(&d, &ours);

    // A copy with a new identity: the same tree, disk-only (its memory states are dropped with
    // a warning); a delete merges live; `first` gives its disk.
    std::fs::create_dir(root.join("imp")).unwrap();
    let out = d.run(&[
        "vm", "import", "exp/m", "--copy", "--to", "imp", "--new-id", "--name", "n",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(
            "warning: checkpoint(s) first, second keep their disks but not their memory state"
        ),
        "{err}"
    );
    let copy = checkpoints(&d, "n");
    let names = |cps: &[vireo_api::Checkpoint]| -> Vec<(String, Option<String>, bool)> {
        cps.iter()
            .map(|c| {
                let parent = c
                    .parent
                    .map(|p| cps.iter().find(|x| x.id == p).unwrap().name.clone());
                (c.name.clone(), parent, c.current)
            })
            .collect()
    };
    assert_eq!(names(&copy), names(&tree));
    assert!(copy
        .iter()
        .all(|c| !c.has_state && tree.iter().all(|t| t.id != c.id)));
    assert_eq!(d.vm("n").state.name(), "off");
    d.ok(&["vm", "start", "n"]);
    wait_running(&d, "n");
    let mut c = Console::attach(&d, "n");
    c.ok("DISK 0 VERIFY 0 64 7");
    drop(c);
    let second = copy.iter().find(|c| c.name == "second").unwrap().clone();
    let pid = d.worker_pid("n");
    d.ok(&["checkpoint", "rm", "n", "second"]);
    assert_eq!(d.worker_pid("n"), pid);
    assert_eq!(d.vm("n").spec.disks[0].path, second.disks[0].frozen);
    let mut c = Console::attach(&d, "n");
    c.ok("DISK 0 VERIFY 0 64 7");
    drop(c);
    d.ok(&["checkpoint", "apply", "n", "first", "--stop"]);
    assert_eq!(d.vm("n").state.name(), "off", "a disk-only checkpoint");
    d.ok(&["vm", "start", "n"]);
    wait_running(&d, "n");
    let mut c = Console::attach(&d, "n");
    c.ok("DISK 0 VERIFY 0 64 5");
    drop(c);
    d.ok(&["vm", "turn-off", "n"]);

    // Moved (the source removed, imported in place with its id): the whole tree, the VM
    // continuing from the export's moment, `first` with its memory and disk.
    d.ok(&["vm", "turn-off", "m"]);
    d.ok(&["vm", "rm", "m"]);
    d.ok(&["vm", "import", "exp/m"]);
    assert_eq!(shape(&checkpoints(&d, "m")), shape(&tree));
    assert_eq!(d.vm("m").state.name(), "saved");
    d.ok(&["vm", "start", "m"]);
    wait_running(&d, "m");
    let mut c = Console::attach(&d, "m");
    assert_eq!(mem_sum(&mut c), now_sum);
    c.ok("DISK 0 VERIFY 0 64 7");
    drop(c);
    d.ok(&["vm", "turn-off", "m"]);
    first_applies(&d, "m", &first_sum, &[]);
    d.ok(&["checkpoint", "rm", "m", "second"]);
    assert_eq!(checkpoints(&d, "m").len(), 1);
}
