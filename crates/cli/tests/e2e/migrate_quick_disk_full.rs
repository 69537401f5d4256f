//! End to end, under KVM and as root: a quick migration whose destination has no room for the
//! saved state (docs/migration.md, "Fault injection"). The destination's VM folders live on a
//! 4 MiB tmpfs and the guest holds 8 MiB of data, so receiving `memory.bin` fails with ENOSPC
//! before the commit. The job fails naming the cause, the VM is started again on the source
//! from the state it saved (its memory, workload and disk carry on), and the destination has
//! neither a record of the VM nor a file of it.

use std::time::{Duration, Instant};

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::migration::{
    migration_address, start_migration, trust_each_other, two_hosts, wait_for_end, Storage,
};
use vireod_harness::tmpfs::Tmpfs;

#[test]
fn a_quick_migration_to_a_full_destination_fails_and_the_vm_runs_on_at_the_source() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm)
        || !vireo_testkit::require(vireo_testkit::Need::Root)
    {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Shared) else {
        return;
    };
    std::fs::write(a.dir.path().join("m.img"), vec![0u8; 1 << 20]).unwrap();
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    a.ok(&[
        "vm", "create", "m", "--kernel", &kernel, "--memory", "32M", "--disk", "m.img",
    ]);
    a.ok(&["vm", "start", "m"]);
    let pid = a.worker_pid("m");
    let mut c = Console::attach(&a, "m");
    c.ok("DISK 0 WRITE 0 64 5");
    c.ok("MEM FILL 16 8 9");
    c.ok("DIRTY START 8 4 0");
    drop(c);
    trust_each_other(&a, &b);
    let to = migration_address(&b);

    // B's VM folders (`<state>/vms`, where an arriving VM's saved state is written) on a
    // tmpfs with room for half of the guest's data.
    let vms = b.dir.path().join("state").join("vms");
    let _mounted = Tmpfs::mount(&vms, "4M").expect("mounting a tmpfs as root failed");

    let job_id = start_migration(&a, &["m", "--to", &to, "--quick"]);
    let j = wait_for_end(&a, &job_id, Duration::from_secs(120));
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap_or_default();
    eprintln!("the job's error: {error}");
    assert!(
        error.contains("storing") && error.contains("No space left on device"),
        "{error}"
    );
    assert!(error.contains("it is restored here"), "{error}");

    // The VM runs here again, restored from the state it saved (a new worker), and carries on.
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.vm("m").state.name() != "running" {
        assert!(
            Instant::now() < deadline,
            "the VM is not running on the source again: {:?}",
            a.vm("m").state
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_ne!(
        a.worker_pid("m"),
        pid,
        "a quick migration saves: a new worker restores"
    );
    let mut c = Console::attach(&a, "m");
    let stop = c.ok("DIRTY STOP");
    assert!(stop.contains("passes="), "{stop}");
    c.ok("MEM VERIFY 16 8 9");
    c.ok("DISK 0 VERIFY 0 64 5");
    c.ok("DISK 0 WRITE 64 8 6");
    c.ok("DISK 0 VERIFY 64 8 6");
    drop(c);

    // Nothing of it on B.
    let (_, line) = b.fails(&["vm", "show", "m"]);
    assert!(line.contains("no VM \"m\""), "{line}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = || std::fs::read_dir(&vms).unwrap().count();
    while left() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let names: Vec<_> = std::fs::read_dir(&vms)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.is_empty(), "left on the destination: {names:?}");
    a.ok(&["vm", "turn-off", "m"]);
}
