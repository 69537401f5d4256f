//! End to end, under KVM: the source's `--postcopy` reaches the destination (peer protocol 7,
//! docs/migration-performance.md "Guest RAM from the hugetlb pool"). Live-migrated with `--postcopy
//! never` between two vireods, the destination's worker puts the guest's RAM on the hugetlb pool
//! (seen in its smaps); migrated back with the default (`auto`, so post-copy may come and the RAM
//! must take userfaultfd fills) it does not. The guest's memory verifies after each move. Its own
//! test binary: the pool (setup.sh: 512 pages) is then shared with no other test.

use std::time::{Duration, Instant};

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::migration::{migration_address, trust_each_other, two_hosts, Storage};
use vireod_harness::Daemon;

const RAM_MIB: u64 = 32;

/// Free pages of the hugetlb pool (2 MiB each).
fn pool_free_pages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Migrates `m` from `from` to `to` (live) with `extra` arguments; the job completes.
fn migrate(from: &Daemon, to: &Daemon, extra: &[&str]) {
    let address = migration_address(to);
    let mut args = vec!["vm", "migrate", "m", "--to", &address, "--output", "json"];
    args.extend(extra);
    let job: serde_json::Value = serde_json::from_str(&from.ok(&args)).unwrap();
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(to.vm("m").state.name(), "running");
}

#[test]
fn postcopy_never_puts_the_destinations_ram_on_the_hugetlb_pool() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    // Room for the source's RAM and the destination's at once (bounded wait for other
    // processes' VMs to give pages back).
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool_free_pages() < 2 * RAM_MIB / 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        pool_free_pages() >= 2 * RAM_MIB / 2,
        "the hugetlb pool has {} free 2 MiB pages, {} needed (./setup.sh raises vm.nr_hugepages)",
        pool_free_pages(),
        2 * RAM_MIB / 2
    );
    let Some((a, b)) = two_hosts(Storage::Shared) else {
        return;
    };
    trust_each_other(&a, &b);
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    let memory = format!("{RAM_MIB}M");
    a.ok(&[
        "vm", "create", "m", "--kernel", &kernel, "--memory", &memory,
    ]);
    a.ok(&["vm", "start", "m"]);
    let mut c = Console::attach(&a, "m");
    c.ok("MEM FILL 8 16 3");
    drop(c);

    migrate(&a, &b, &["--postcopy", "never"]);
    let on_pool = vireo_testkit::smaps::guest_ram_hugetlb_kib(&b.worker_pid("m").to_string());
    assert!(
        on_pool >= 16 * 1024,
        "with --postcopy never the destination's guest RAM should be on the pool: {on_pool} KiB"
    );
    let mut c = Console::attach(&b, "m");
    c.ok("MEM VERIFY 8 16 3");
    drop(c);

    // Back with the default: post-copy may come, so not on the pool.
    migrate(&b, &a, &[]);
    let on_pool = vireo_testkit::smaps::guest_ram_hugetlb_kib(&a.worker_pid("m").to_string());
    assert_eq!(
        on_pool, 0,
        "with --postcopy auto the RAM must stay off the pool"
    );
    let mut c = Console::attach(&a, "m");
    c.ok("MEM VERIFY 8 16 3");
    drop(c);
    a.ok(&["vm", "turn-off", "m"]);
}
