//! A running probe VM `m` with two checkpoints, each with its own memory fill and disk pattern
//! (the migration and export tests of the checkpoint tree), and the checks on it.

use std::time::{Duration, Instant};

use vireo_api::Checkpoint;

use super::console::Console;
use super::Daemon;

/// What a tree is to its user: ids, names, parent links, times, "now", state.
pub fn shape(cps: &[Checkpoint]) -> Vec<(uuid::Uuid, String, Option<uuid::Uuid>, i64, bool, bool)> {
    cps.iter()
        .map(|c| {
            let c = c.clone();
            (c.id, c.name, c.parent, c.created_at, c.current, c.has_state)
        })
        .collect()
}

/// `MEM SUM 16 8`'s sum.
pub fn mem_sum(c: &mut Console) -> String {
    let line = c.ok("MEM SUM 16 8");
    line.split("sum=").nth(1).expect("a sum").trim().to_owned()
}

/// The probe VM `m` running on A's VHDX disk with checkpoints `first` (disk seed 5, memory
/// seed 9) and `second` (6, 10), then written again (7, 11). The memory sums of `first` and of
/// now.
pub fn vm_with_two_checkpoints(a: &Daemon) -> (String, String) {
    let disk = a.dir.path().join("m.vhdx");
    a.ok(&["disk", "create", disk.to_str().unwrap(), "--size", "64M"]);
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    a.ok(&[
        "vm", "create", "m", "--kernel", &kernel, "--memory", "32M", "--disk", "m.vhdx",
    ]);
    a.ok(&["vm", "start", "m"]);
    let mut c = Console::attach(a, "m");
    c.ok("DISK 0 WRITE 0 64 5");
    c.ok("MEM FILL 16 8 9");
    let first = mem_sum(&mut c);
    a.ok(&["checkpoint", "create", "m", "first"]);
    c.ok("DISK 0 WRITE 0 64 6");
    c.ok("MEM FILL 16 8 10");
    a.ok(&["checkpoint", "create", "m", "second"]);
    c.ok("DISK 0 WRITE 0 64 7");
    c.ok("MEM FILL 16 8 11");
    let now = mem_sum(&mut c);
    assert_ne!(first, now);
    (first, now)
}

/// `checkpoint apply VM first --stop` on `d`, then start: the guest has `first`'s memory
/// (`first_sum`) and disk pattern; `then` runs on its console before the VM is turned off.
pub fn first_applies(d: &Daemon, vm: &str, first_sum: &str, then: &[&str]) {
    d.ok(&["checkpoint", "apply", vm, "first", "--stop"]);
    d.ok(&["vm", "start", vm]);
    wait_running(d, vm);
    let mut c = Console::attach(d, vm);
    assert_eq!(mem_sum(&mut c), first_sum);
    c.ok("DISK 0 VERIFY 0 64 5");
    for cmd in then {
        c.ok(cmd);
    }
    drop(c);
    d.ok(&["vm", "turn-off", vm]);
}

pub fn wait_running(d: &Daemon, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.vm(vm).state.name() != "running" {
        assert!(
            Instant::now() < deadline,
            "{vm} is not running: {:?}",
            d.vm(vm).state
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
