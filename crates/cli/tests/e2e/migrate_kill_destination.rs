//! End to end, under KVM: the fault run of `crates/hostd/tests/integration/migrate_faults.rs` ("the
//! destination worker killed in pre-copy") with the real workers and the probe guest instead
//! of the fake worker. Two vireods on loopback sharing the disk's folder; `vireo vm migrate`
//! held to 1 MiB/s so the first pass is still running when the destination's `vireo-vm` is
//! SIGKILLed. Afterwards the VM is in exactly one place: running on the source with the same
//! worker (not paused), its memory sum and disk data intact and still written to, the job
//! failed; nothing of it on the destination.

use std::time::{Duration, Instant};

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::migration::{
    migration_address, start_migration, trust_each_other, two_hosts, wait_for_end,
    wait_for_progress, Storage,
};

#[test]
fn destination_worker_killed_mid_copy_leaves_the_vm_running_on_the_source() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Shared) else {
        return;
    };
    std::fs::write(a.dir.path().join("m.img"), vec![0u8; 4 << 20]).unwrap();
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    a.ok(&[
        "vm", "create", "m", "--kernel", &kernel, "--memory", "64M", "--disk", "m.img",
    ]);
    a.ok(&["vm", "start", "m"]);
    let source_pid = a.worker_pid("m");
    let mut c = Console::attach(&a, "m");
    c.ok("DISK 0 WRITE 0 512 5");
    c.ok("MEM FILL 16 32 9");
    let sum = c.ok("MEM SUM 16 32");
    c.ok("DIRTY START 8 4 0");
    trust_each_other(&a, &b);
    let to = migration_address(&b);

    let job_id = start_migration(&a, &["m", "--to", &to, "--bandwidth", "1M"]);
    wait_for_progress(&a, &job_id, "transferred_bytes");
    let destination_pid = b.worker_pid("m");
    // SAFETY: kill(2) of the destination's worker, a process this test's vireod started.
    let killed = unsafe { libc::kill(destination_pid as i32, libc::SIGKILL) };
    assert_eq!(killed, 0);

    let j = wait_for_end(&a, &job_id, Duration::from_secs(60));
    eprintln!("the job after the destination's worker was killed: {j}");
    assert_eq!(j["state"], "failed", "{j}");

    // Exactly one place: here, the same worker, running.
    let here = a.vm("m");
    assert_eq!(here.state.name(), "running");
    assert_eq!(a.worker_pid("m"), source_pid);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = b.run(&["vm", "show", "m"]);
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && err.contains("no VM \"m\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still on the destination: {}{err}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stop = c.ok("DIRTY STOP");
    assert!(!stop.ends_with(" pages=0"), "{stop}");
    assert_eq!(c.ok("MEM SUM 16 32"), sum);
    c.ok("DISK 0 VERIFY 0 512 5");
    c.ok("DISK 0 WRITE 1024 64 6");
    c.ok("DISK 0 FLUSH");
    c.ok("DISK 0 VERIFY 1024 64 6");
    let log = a.ok(&["vm", "console", "m", "--log"]);
    assert_eq!(
        log.matches("PROBE READY").count(),
        1,
        "the guest booted again: {log}"
    );
}
