//! End to end, under KVM and as root: a shared-nothing migration (`--with-storage --dest-dir`)
//! whose destination file system fills up while the disks are copied (docs/migration.md,
//! "Fault injection"). The dest-dir is a tmpfs made for the test, with room for the copy when
//! the offer is checked; once the copy has begun the test fills it. The job fails naming the
//! dest-dir and the space the copy needs, the VM runs on the source with the same worker and
//! its disk data, and every file the migration created on the destination is gone (the test's
//! own filler stays); the destination has no record of the VM.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::vireod_harness;
use vireod_harness::migration::{
    files_in, migration_address, start_probe_on_raw_disk, start_shared_nothing, trust_each_other,
    two_hosts, wait_for_end, wait_for_progress, Storage,
};
use vireod_harness::tmpfs::Tmpfs;

/// Writes zeros into `path` until the file system is full (ENOSPC is the point).
fn fill(path: &std::path::Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 256 << 10];
    loop {
        if let Err(e) = f.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
            return;
        }
    }
}

#[test]
fn the_destination_disk_full_mid_copy_fails_the_job_and_leaves_the_vm_on_the_source() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm)
        || !vireo_testkit::require(vireo_testkit::Need::Root)
    {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Separate) else {
        return;
    };
    // A raw disk of which the guest writes 16 MiB: the offer asks for 16 MiB of room.
    let mut c = start_probe_on_raw_disk(&a, "m", 64 << 20);
    let pid = a.worker_pid("m");
    c.ok("DISK 0 WRITE 8192 32768 5");

    trust_each_other(&a, &b);
    let to = migration_address(&b);

    // 24 MiB: room for the 16 MiB copy when the offer is checked.
    let dest = b.dir.path().join("small");
    let _mounted = Tmpfs::mount(&dest, "24M").expect("mounting a tmpfs as root failed");
    let dest_s = dest.to_str().unwrap().to_owned();

    // Held to 2 MiB/s so the copy is still running when the file system fills.
    let job_id = start_shared_nothing(&a, "m", &to, &dest, &["--bandwidth", "2M"]);
    wait_for_progress(&a, &job_id, "disk_bytes_copied");
    fill(&dest.join("filler"));
    let j = wait_for_end(&a, &job_id, Duration::from_secs(120));
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap_or_default();
    eprintln!("the job's error: {error}");
    assert!(
        error.contains(&dest_s)
            && error.contains("ran out of space")
            && error.contains("need up to"),
        "{error}"
    );
    assert!(error.contains("runs on here"), "{error}");

    // The VM: here, the same worker, running, its disk as written; nothing of it on B.
    assert_eq!(a.vm("m").state.name(), "running");
    assert_eq!(a.worker_pid("m"), pid);
    c.ok("DISK 0 VERIFY 8192 32768 5");
    c.ok("DISK 0 WRITE 40960 256 6");
    c.ok("DISK 0 VERIFY 40960 256 6");
    let (_, line) = b.fails(&["vm", "show", "m"]);
    assert!(line.contains("no VM \"m\""), "{line}");
    // Every file the migration made is gone; the filler is the test's.
    let deadline = Instant::now() + Duration::from_secs(10);
    while files_in(&dest) != ["filler"] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(files_in(&dest), ["filler"]);
    a.ok(&["vm", "turn-off", "m"]);
}
