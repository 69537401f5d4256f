//! End to end, under KVM: a VM whose disk slots have a gap (the middle one of three disks
//! hot-removed) live-migrates between two vireods on shared storage. The destination builds
//! its skeleton with the source's slot layout (`Offer.disk_slots`, docs/migration.md, "The
//! destination"), so the guest's drivers find each disk where it was; the empty slot takes a
//! hot-added disk there afterwards.

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::migration::{migration_address, trust_each_other, two_hosts, Storage};

#[test]
fn a_vm_with_a_gap_in_its_disk_slots_migrates_live_and_keeps_its_layout() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Shared) else {
        return;
    };
    for name in ["d0.img", "d1.img", "d2.img", "hot.img"] {
        std::fs::write(a.dir.path().join(name), vec![0u8; 1 << 20]).unwrap();
    }
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    a.ok(&[
        "vm", "create", "m", "--kernel", &kernel, "--memory", "32M", "--disk", "d0.img", "--disk",
        "d1.img", "--disk", "d2.img",
    ]);
    a.ok(&["vm", "start", "m"]);
    let mut c = Console::attach(&a, "m");
    for (i, seed) in [(0, 1), (1, 2), (2, 3)] {
        c.ok(&format!("DISK {i} WRITE 0 64 {seed}"));
    }
    a.ok(&["vm", "disk", "rm", "m", "1"]);
    assert_eq!(c.ok("RESCAN"), "OK disks=2 added=0 removed=1");
    // The guest's disk 1 is now the third slot's.
    c.ok("DISK 1 VERIFY 0 64 3");
    c.ok("MEM FILL 16 8 9");
    c.ok("DIRTY START 8 4 0");
    drop(c);

    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let out = a.ok(&["vm", "migrate", "m", "--to", &to, "--output", "json"]);
    let job: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(job["state"], "completed", "{job}");

    assert_eq!(b.vm("m").state.name(), "running");
    let mut c = Console::attach(&b, "m");
    let stop = c.ok("DIRTY STOP");
    assert!(stop.contains("passes="), "{stop}");
    c.ok("MEM VERIFY 16 8 9");
    // Nothing moved in the guest's view: the same two disks, each in its slot.
    assert_eq!(c.ok("RESCAN"), "OK disks=2 added=0 removed=0");
    c.ok("DISK 0 VERIFY 0 64 1");
    c.ok("DISK 1 VERIFY 0 64 3");
    c.ok("DISK 1 WRITE 64 64 4");
    c.ok("DISK 1 VERIFY 64 64 4");
    // The gap is free on the destination: a hot-added disk goes into it.
    let hot = a.dir.path().join("hot.img");
    let out = b.ok(&["vm", "disk", "add", "m", hot.to_str().unwrap()]);
    assert!(out.contains("as disk 1 "), "{out}");
    assert_eq!(c.ok("RESCAN"), "OK disks=3 added=1 removed=0");
    c.ok("DISK 1 WRITE 0 8 5");
    c.ok("DISK 1 VERIFY 0 8 5");
    c.ok("DISK 2 VERIFY 64 64 4");
    drop(c);
    b.ok(&["vm", "turn-off", "m"]);
}
