//! End to end, under KVM: a shared-nothing migration carries the VM's kernel and initrd when
//! the destination lacks them (docs/migration.md, "Shared-nothing migration"). The VM boots
//! from a copy of the probe and an initrd in host A's folder, which host B cannot reach.
//!
//! - A file of the kernel's name with other content in B's `dest_dir` refuses the offer,
//!   naming it; nothing is left there and the VM runs on at A.
//! - A migration cancelled while its disk copies (after the boot files arrived) leaves
//!   nothing in `dest_dir`: the kernel put in place there goes with the rest.
//! - The migration: B receives both files (the job says so), checks them, and boots the
//!   skeleton from them; the guest runs on. A keeps its own copies (shared images).
//! - Back to A: another VM of A (off) boots from the same files, found by their hashes and
//!   used; nothing travels.
//! - To B again: the kernel and initrd B received the first time are found in `dest_dir` by
//!   hash and reused; nothing travels.
//! - A VM whose kernel is at the same path on both hosts (the probe's folder is a storage root
//!   of both): nothing travels.

use std::path::Path;
use std::time::Duration;

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::migration::{
    files_in, migration_address, start_shared_nothing, trust_each_other, two_hosts, wait_for_end,
    wait_for_progress, Storage,
};
use vireod_harness::Daemon;

/// The names of the job's phases.
fn phases(job: &serde_json::Value) -> Vec<String> {
    job["migration"]["phases"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn boot_files_sent(job: &serde_json::Value) -> Option<String> {
    phases(job)
        .into_iter()
        .find(|p| p.starts_with("boot files sent"))
}

fn migrate(from: &Daemon, to: &Daemon, dest: &Path, extra: &[&str]) -> String {
    start_shared_nothing(from, "m", &migration_address(to), dest, extra)
}

fn spec_paths(d: &Daemon) -> (String, String) {
    let vm = d.vm("m");
    (
        vm.spec.kernel.display().to_string(),
        vm.spec.initrd.unwrap().display().to_string(),
    )
}

#[test]
fn the_kernel_and_initrd_travel_to_a_host_that_lacks_them_and_only_then() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Separate) else {
        return;
    };
    trust_each_other(&a, &b);
    let kernel = a.dir.path().join("probe-kernel.elf");
    std::fs::copy(vireo_probe_image::probe_elf(), &kernel).unwrap();
    let initrd = a.dir.path().join("initrd.img");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&initrd, &bytes).unwrap();
    std::fs::File::create(a.dir.path().join("m.img"))
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let (k, i) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    let create = [
        "vm", "create", "--kernel", k, "--initrd", i, "--memory", "32M",
    ];
    a.ok(&[&create[..], &["m", "--disk", "m.img"]].concat());
    // Another VM here boots from the same files (never started).
    a.ok(&[&create[..], &["o"]].concat());
    a.ok(&["vm", "start", "m"]);
    let mut c = Console::attach(&a, "m");
    c.ok("DISK 0 WRITE 0 4096 5");
    c.ok("MEM FILL 16 4 9");
    let sum = c.ok("MEM SUM 16 4");

    // Another file of the kernel's name in dest_dir: refused, nothing made there.
    let dest = b.dir.path().join("in");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("probe-kernel.elf"), b"another kernel").unwrap();
    let job = migrate(&a, &b, &dest, &[]);
    let j = wait_for_end(&a, &job, Duration::from_secs(60));
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("probe-kernel.elf exists on this host and is not the VM's kernel"),
        "{error}"
    );
    assert_eq!(files_in(&dest), ["probe-kernel.elf"]);
    assert_eq!(a.vm("m").state.name(), "running");
    std::fs::remove_file(dest.join("probe-kernel.elf")).unwrap();

    // Cancelled while the disk copies, the boot files in place by then: all of it goes.
    c.ok("DISK 0 WRITE 8192 8192 6");
    let job = migrate(&a, &b, &dest, &["--bandwidth", "1M"]);
    wait_for_progress(&a, &job, "disk_bytes_copied");
    a.ok(&["job", "cancel", &job]);
    let j = wait_for_end(&a, &job, Duration::from_secs(60));
    assert_eq!(j["state"], "cancelled", "{j}");
    assert!(boot_files_sent(&j).is_some(), "{:?}", phases(&j));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !files_in(&dest).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(files_in(&dest), Vec::<String>::new());
    assert_eq!(a.vm("m").state.name(), "running");

    // The migration: both files travel and the VM boots there from them.
    let job = migrate(&a, &b, &dest, &[]);
    let j = wait_for_end(&a, &job, Duration::from_secs(120));
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(
        boot_files_sent(&j).as_deref(),
        Some("boot files sent: boot-kernel, boot-initrd"),
        "{:?}",
        phases(&j)
    );
    let on_b = (
        dest.join("probe-kernel.elf").display().to_string(),
        dest.join("initrd.img").display().to_string(),
    );
    assert_eq!(spec_paths(&b), on_b);
    assert_eq!(
        std::fs::read(dest.join("probe-kernel.elf")).unwrap(),
        std::fs::read(&kernel).unwrap()
    );
    assert_eq!(std::fs::read(dest.join("initrd.img")).unwrap(), bytes);
    assert_eq!(
        files_in(&dest),
        ["initrd.img", "m.img", "probe-kernel.elf"],
        "no temporary file stays"
    );
    // A's copies are shared images: never deleted by the move.
    assert!(kernel.exists() && initrd.exists());
    let mut c = Console::attach(&b, "m");
    c.ok("DISK 0 VERIFY 0 4096 5");
    assert_eq!(c.ok("MEM SUM 16 4"), sum);

    // Back to A, where VM o boots from the same files: nothing travels.
    let back = a.dir.path().join("back");
    std::fs::create_dir(&back).unwrap();
    let job = migrate(&b, &a, &back, &[]);
    let j = wait_for_end(&b, &job, Duration::from_secs(120));
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(boot_files_sent(&j), None, "{:?}", phases(&j));
    assert_eq!(
        spec_paths(&a),
        (kernel.display().to_string(), initrd.display().to_string())
    );
    assert_eq!(files_in(&back), ["m.img"]);
    // B deleted its disk copy, never the boot files.
    assert_eq!(files_in(&dest), ["initrd.img", "probe-kernel.elf"]);

    // To B again: found in dest_dir by their hashes and reused.
    let job = migrate(&a, &b, &dest, &[]);
    let j = wait_for_end(&a, &job, Duration::from_secs(120));
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(boot_files_sent(&j), None, "{:?}", phases(&j));
    assert_eq!(spec_paths(&b), on_b);
    let mut c = Console::attach(&b, "m");
    c.ok("DISK 0 VERIFY 0 4096 5");
    c.ok("DISK 0 VERIFY 8192 8192 6");
    assert_eq!(c.ok("MEM SUM 16 4"), sum);
    b.ok(&["vm", "turn-off", "m"]);

    // The kernel at the same path on both hosts: nothing travels.
    let probe = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    std::fs::File::create(a.dir.path().join("p.img"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    a.ok(&[
        "vm", "create", "p", "--kernel", &probe, "--memory", "32M", "--disk", "p.img",
    ]);
    a.ok(&["vm", "start", "p"]);
    Console::attach(&a, "p").ok("PING");
    let job = start_shared_nothing(&a, "p", &migration_address(&b), &dest, &[]);
    let j = wait_for_end(&a, &job, Duration::from_secs(120));
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(boot_files_sent(&j), None, "{:?}", phases(&j));
    assert_eq!(
        std::fs::canonicalize(b.vm("p").spec.kernel).unwrap(),
        std::fs::canonicalize(&probe).unwrap()
    );
    Console::attach(&b, "p").ok("PING");
    b.ok(&["vm", "turn-off", "p"]);
}
