//! End to end, under KVM: `vireo vm migrate --quick` of a probe-guest VM between two real
//! vireods (own state directories, `--migration-listen 127.0.0.1:0`, trusting each other
//! through `vireo host trust add`) with real `vireo-vm` workers. The disk lives where both see
//! it (shared storage). The guest writes a disk pattern, fills memory and runs its dirty
//! workload (a counter); after the migration the VM is gone from the source and runs on the
//! destination with the same id, the workload still running (no second `PROBE READY`), memory
//! and disk verifying. Before trust is set up the migration is refused in the TLS handshake
//! and the VM keeps running on the source. Then the VM is live-migrated back (`vireo vm migrate`
//! without `--quick`: pre-copy between the workers while the guest dirties memory), and on the
//! first host again its workload, memory and disk carry on the same way. The VM's second disk
//! is a differencing VHDX on a base: it moves live between the vireods too (QEMU cannot
//! live-migrate a VM on VHDX at all), and is checked whole at the end.

use std::time::Instant;

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::migration::{
    create_child, migration_address, trust_each_other, two_hosts, Storage,
};

#[test]
fn probe_guest_quick_migrates_between_two_vireods_then_live_migrates_back_and_forth() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    // B reaches A's folder: the disk is on storage both hosts share.
    let Some((a, b)) = two_hosts(Storage::Shared) else {
        return;
    };
    std::fs::write(a.dir.path().join("m.img"), vec![0u8; 1 << 20]).unwrap();
    // Disk 1: a differencing VHDX on a base, both where the two hosts reach them; its locks
    // and chain go from worker to worker at each move, and the guest writes to it between.
    let base = a.dir.path().join("base.vhdx");
    let top = a.dir.path().join("top.vhdx");
    a.ok(&["disk", "create", base.to_str().unwrap(), "--size", "16M"]);
    create_child(&a, &top, &base);
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    a.ok(&[
        "vm", "create", "m", "--kernel", &kernel, "--memory", "32M", "--disk", "m.img", "--disk",
        "top.vhdx",
    ]);
    a.ok(&["vm", "start", "m"]);
    let id = a.vm("m").identity.id;
    let mut c = Console::attach(&a, "m");
    c.ok("DISK 0 WRITE 0 64 5");
    c.ok("DISK 1 WRITE 0 2048 4");
    c.ok("MEM FILL 16 8 9");
    c.ok("DIRTY START 8 4 0");
    drop(c);

    let to = migration_address(&b);
    // Not trusted yet: refused in the handshake, the VM runs on here.
    let (code, line) = a.fails(&["vm", "migrate", "m", "--to", &to, "--quick"]);
    assert_eq!(code, 1, "{line}");
    assert!(
        line.contains("TLS handshake") && line.contains("trust add"),
        "{line}"
    );
    assert_eq!(a.vm("m").state.name(), "running");
    trust_each_other(&a, &b);

    let started = Instant::now();
    let out = a.ok(&[
        "vm", "migrate", "m", "--to", &to, "--quick", "--output", "json",
    ]);
    let job: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(job["state"], "completed", "{job}");
    let downtime = job["migration"]["downtime_ms"].as_u64().unwrap();
    eprintln!(
        "quick migration of a 32 MiB probe guest: downtime {downtime} ms, job {} ms, {} bytes sent",
        started.elapsed().as_millis(),
        job["migration"]["transferred_bytes"]
    );
    // Gone here, running there with its identity.
    let (_, line) = a.fails(&["vm", "show", "m"]);
    assert!(line.contains("no VM \"m\""), "{line}");
    let there = b.vm("m");
    assert_eq!(there.state.name(), "running");
    assert_eq!(there.identity.id, id);
    let mut c = Console::attach(&b, "m");
    let stop = c.ok("DIRTY STOP");
    assert!(stop.contains("passes="), "{stop}");
    c.ok("MEM VERIFY 16 8 9");
    c.ok("DISK 0 VERIFY 0 64 5");
    c.ok("DISK 1 VERIFY 0 2048 4");
    drop(c);
    let log = b.ok(&["vm", "console", "m", "--log"]);
    assert!(
        !log.contains("PROBE READY"),
        "the guest booted again: {log}"
    );

    // Live, back to A, while the guest dirties memory and has written more to its disk.
    let mut c = Console::attach(&b, "m");
    c.ok("DISK 0 WRITE 64 64 6");
    c.ok("DISK 1 WRITE 1024 4096 6");
    c.ok("DIRTY START 8 4 0");
    drop(c);
    let to_a = migration_address(&a);
    let out = b.ok(&[
        "vm",
        "migrate",
        "m",
        "--to",
        &to_a,
        "--max-downtime",
        "50ms",
        "--output",
        "json",
    ]);
    let job: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(job["state"], "completed", "{job}");
    eprintln!(
        "live migration back: downtime {} ms, {} rounds, {} bytes sent",
        job["migration"]["downtime_ms"],
        job["migration"]["round"],
        job["migration"]["transferred_bytes"]
    );
    // The job's timeline: vireod's steps with its worker's in between, in order.
    let phases = job["migration"]["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases.iter().filter_map(|p| p["name"].as_str()).collect();
    for want in [
        "peer connected (TLS)",
        "offer accepted",
        "worker: stream 0 OK",
        "worker: pre-copy",
        "worker: RUNNING there",
        "record removed",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let at: Vec<u64> = phases.iter().filter_map(|p| p["at_us"].as_u64()).collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "{phases:?}");
    eprintln!("live migration back, phases: {names:?} at {at:?} µs");
    let (_, line) = b.fails(&["vm", "show", "m"]);
    assert!(line.contains("no VM \"m\""), "{line}");
    let here = a.vm("m");
    assert_eq!(here.state.name(), "running");
    assert_eq!(here.identity.id, id);
    let mut c = Console::attach(&a, "m");
    let stop = c.ok("DIRTY STOP");
    assert!(stop.contains("passes="), "{stop}");
    c.ok("MEM VERIFY 16 8 9");
    c.ok("DISK 0 VERIFY 0 64 5");
    c.ok("DISK 0 VERIFY 64 64 6");
    c.ok("DISK 0 WRITE 128 8 7");
    c.ok("DISK 0 VERIFY 128 8 7");
    c.ok("DISK 1 VERIFY 0 1024 4");
    c.ok("DISK 1 VERIFY 1024 4096 6");
    c.ok("DISK 1 WRITE 8192 64 7");
    drop(c);
    let log = a.ok(&["vm", "console", "m", "--log"]);
    assert!(
        !log.contains("PROBE READY"),
        "the guest booted again on A: {log}"
    );

    // And to B again in post-copy, over two streams: the VM runs there at once, the rest of
    // its pages follow on both.
    let mut c = Console::attach(&a, "m");
    c.ok("DIRTY START 8 4 0");
    drop(c);
    let out = a.ok(&[
        "vm",
        "migrate",
        "m",
        "--to",
        &to,
        "--streams",
        "2",
        "--postcopy",
        "always",
        "--output",
        "json",
    ]);
    let job: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(job["state"], "completed", "{job}");
    eprintln!(
        "post-copy migration: downtime {} ms, {} bytes sent",
        job["migration"]["downtime_ms"], job["migration"]["transferred_bytes"]
    );
    let (_, line) = a.fails(&["vm", "show", "m"]);
    assert!(line.contains("no VM \"m\""), "{line}");
    assert_eq!(b.vm("m").state.name(), "running");
    let mut c = Console::attach(&b, "m");
    let stop = c.ok("DIRTY STOP");
    assert!(stop.contains("passes="), "{stop}");
    c.ok("MEM VERIFY 16 8 9");
    c.ok("DISK 0 VERIFY 128 8 7");
    c.ok("DISK 1 VERIFY 8192 64 7");
    c.ok("DISK 1 VERIFY 1024 4096 6");
    drop(c);
    // Off: the chain is whole and consistent after three moves between two vireods.
    b.ok(&["vm", "turn-off", "m"]);
    a.ok(&["disk", "check", top.to_str().unwrap()]);
    a.ok(&["disk", "check", base.to_str().unwrap()]);
}
