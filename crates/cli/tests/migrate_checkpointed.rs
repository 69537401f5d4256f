//! End to end, under KVM: a VM with checkpoints is not migrated (live, quick or with its
//! storage) until migration can carry its checkpoint tree: its running disk is a differencing
//! child in vireod's own folder for the VM, which the source removes with the VM's record, and
//! the checkpoints (records, memory, frozen files) would be left behind without an owner. The
//! refusal names the checkpoints and what to do; the VM runs on untouched and keeps them.
//! Once they are deleted (merged live), the same VM migrates.

mod vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::migration::{migration_address, trust_each_other, two_hosts, Storage};

#[test]
fn a_vm_with_checkpoints_is_refused_and_migrates_once_they_are_deleted() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    // B reaches all of A's folder, vireod's own state included: nothing but the checkpoint
    // rule stands in the way.
    let Some((a, b)) = two_hosts(Storage::Shared) else {
        return;
    };
    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let disk = a.dir.path().join("m.vhdx");
    a.ok(&["disk", "create", disk.to_str().unwrap(), "--size", "64M"]);
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    a.ok(&[
        "vm", "create", "m", "--kernel", &kernel, "--memory", "32M", "--disk", "m.vhdx",
    ]);
    a.ok(&["vm", "start", "m"]);
    let pid = a.worker_pid("m");
    let mut c = Console::attach(&a, "m");
    c.ok("DISK 0 WRITE 0 64 5");
    drop(c);
    a.ok(&["checkpoint", "create", "m", "before-move"]);
    let running_on = a.vm("m").spec.disks[0].path.clone();
    assert_ne!(running_on, disk, "the VM runs on the checkpoint's child");

    let dest = b.dir.path().join("moved");
    std::fs::create_dir(&dest).unwrap();
    let cases: [&[&str]; 3] = [
        &["vm", "migrate", "m", "--to", &to],
        &["vm", "migrate", "m", "--to", &to, "--quick"],
        &[
            "vm",
            "migrate",
            "m",
            "--to",
            &to,
            "--with-storage",
            "--dest-dir",
            dest.to_str().unwrap(),
        ],
    ];
    for args in cases {
        let (code, line) = a.fails(args);
        assert_eq!(code, 1, "{args:?}: {line}");
        assert!(
            line.contains("checkpoint") && line.contains("before-move"),
            "{args:?}: the refusal should name the checkpoints: {line}"
        );
        let vm = a.vm("m");
        assert_eq!(vm.state.name(), "running", "{args:?}");
        assert_eq!(a.worker_pid("m"), pid, "{args:?}");
        assert_eq!(vm.spec.disks[0].path, running_on, "{args:?}");
        assert!(running_on.is_file(), "{args:?}: the running child is gone");
        let (_, line) = b.fails(&["vm", "show", "m"]);
        assert!(line.contains("no VM \"m\""), "{args:?}: {line}");
    }
    assert!(std::fs::read_dir(&dest).unwrap().next().is_none());
    let list = a.ok(&["checkpoint", "list", "m"]);
    assert!(list.contains("before-move"), "{list}");

    // Deleted (merged live into m.vhdx): the VM migrates, its data with it.
    a.ok(&["checkpoint", "rm", "m", "before-move"]);
    assert_eq!(a.vm("m").spec.disks[0].path, disk);
    a.ok(&["vm", "migrate", "m", "--to", &to]);
    assert_eq!(b.vm("m").state.name(), "running");
    let mut c = Console::attach(&b, "m");
    c.ok("DISK 0 VERIFY 0 64 5");
}
