//! End to end, under KVM: a shared-nothing migration whose disk copy takes longer than the
//! destination worker's wait for the source's memory streams (docs/migration.md,
//! "Shared-nothing migration", *Limits*). The disks are copied before those streams connect;
//! while disk data keeps arriving, the destination vireod tells its worker the source is
//! alive, so a copy of any length completes. The wait is cut to 3 s here
//! (`VIREO_WAIT_FOR_SOURCE_SECS`, 120 s by default) and the copy held to 2 MiB/s for 16 MiB:
//! about 8 s, well past it.

use std::time::Duration;

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::migration::{
    migration_address, start_probe_on_raw_disk, start_shared_nothing, trust_each_other,
    wait_for_end, wait_for_progress,
};
use vireod_harness::Daemon;

#[test]
fn a_disk_copy_longer_than_the_wait_for_the_memory_streams_completes() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let listen = ["--migration-listen", "127.0.0.1:0"];
    let Some(a) = Daemon::start_args(&listen) else {
        return;
    };
    let Some(b) = Daemon::start_args_env(&listen, &[("VIREO_WAIT_FOR_SOURCE_SECS", "3")]) else {
        return;
    };

    let mut c = start_probe_on_raw_disk(&a, "m", 64 << 20);
    // 16 MiB the copy must carry.
    c.ok("DISK 0 WRITE 8192 32768 5");
    c.ok("MEM FILL 16 8 9");
    let sum = c.ok("MEM SUM 16 8");

    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let dest = b.dir.path().join("copies");
    std::fs::create_dir(&dest).unwrap();
    let job_id = start_shared_nothing(&a, "m", &to, &dest, &["--bandwidth", "2M"]);
    wait_for_progress(&a, &job_id, "disk_bytes_copied");
    let j = wait_for_end(&a, &job_id, Duration::from_secs(120));
    assert_eq!(j["state"], "completed", "{j}");
    eprintln!(
        "copied {} disk bytes with a 3 s wait for the memory streams",
        j["migration"]["disk_bytes_copied"]
    );

    // The VM runs on B, on the copy, with its disk and memory as they were.
    assert_eq!(b.vm("m").state.name(), "running");
    let (_, line) = a.fails(&["vm", "show", "m"]);
    assert!(line.contains("no VM \"m\""), "{line}");
    let mut c = Console::attach(&b, "m");
    c.ok("DISK 0 VERIFY 8192 32768 5");
    assert_eq!(c.ok("MEM SUM 16 8"), sum);
    b.ok(&["vm", "turn-off", "m"]);
}
