//! End to end, the proof for export/import/clone (docs/export.md) with probe-guest VMs
//! through a real vireod and its `vireo-vm` workers: a VM on a differencing VHDX writes a disk
//! pattern and is exported (off), imported with `--copy --new-id`, and both VMs run side by side
//! reading the same data, then diverge independently; every copied file passes `vireo disk
//! check`; clones of the running and of the stopped copy run beside it; an import that cannot be done lists every problem and stores
//! nothing; a saved VM exported and imported (moved) continues its workload when started.

use std::path::Path;

mod vireod_harness;
use vireod_harness::console::Console;
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
