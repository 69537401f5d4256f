//! Guest RAM from the host's hugetlb pool (`RamBacking::HugeTlb`, docs/migration-performance.md
//! "Guest RAM from the hugetlb pool"): a probe VM runs on pool pages (seen in this process's
//! smaps), is saved, restored into a new VM on the pool (the eager path: a lazy fill cannot use
//! hugetlb) and applied in place, with its memory checked by the probe's own sums each time. The
//! pool is shared with every other test's VMs, so a short pool is waited for, never a failure.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vireo_probe_image::{probe_elf, ProbeConsole};
use vireo_vmm::state::Identity;
use vireo_vmm::{
    AfterSave, ApplyOptions, ConsoleConfig, LiveSaveOptions, RamBacking, RamKind, RestoreFrom, Vm,
    VmConfig, VmExit,
};

const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;
const T: Duration = Duration::from_secs(30);

fn config() -> (VmConfig, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(probe_elf(), RAM, 1);
    config.console = ConsoleConfig::Stream(theirs);
    config.ram_backing = RamBacking::HugeTlb;
    (config, ours)
}

/// `make` retried until the pool has room (other tests' VMs give their pages back when they
/// end), for at most a minute.
fn on_the_pool<V>(mut make: impl FnMut() -> Result<V, String>) -> V {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match make() {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("the hugetlb pool stayed short: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// KiB of hugetlb pages this process maps from the guest-RAM file.
fn hugetlb_kib_mapped() -> u64 {
    vireo_testkit::smaps::guest_ram_hugetlb_kib("self")
}

fn sum(console: &mut ProbeConsole, range: &str) -> String {
    let a = console.command(&format!("MEM SUM {range}"), T).unwrap();
    assert!(a.starts_with("OK sum="), "{a}");
    a
}

#[test]
fn kvm_probe_runs_on_the_hugetlb_pool_through_save_restore_and_apply() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm)
        || !vireo_testkit::require(vireo_testkit::Need::Root)
    {
        return;
    }
    let pool: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    if pool < RAM / (2 * MIB) {
        vireo_testkit::skip_env(
            "a hugetlb pool of 32+ pages (./setup.sh reserves one where /proc/sys/vm/nr_hugepages is writable)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("saved");

    // --- Boot on the pool, fill, save paused.
    let (vm, ours) = on_the_pool(|| {
        let (config, ours) = config();
        Vm::new(config)
            .map(|vm| (vm, ours))
            .map_err(|e| e.to_string())
    });
    let h = vm.handle();
    assert_eq!(h.ram_kind(), RamKind::HugeTlb);
    let mut console = ProbeConsole::new(ours.try_clone().unwrap(), ours);
    let run = std::thread::spawn(move || vm.run());
    console.wait_ready(T).unwrap();
    assert_eq!(console.command("MEM FILL 16 16 5", T).unwrap(), "OK");
    assert!(
        hugetlb_kib_mapped() >= 16 * 1024,
        "the guest's pages are not hugetlb pages in this process ({} KiB)",
        hugetlb_kib_mapped()
    );
    let filled = sum(&mut console, "16 48");
    h.pause().unwrap();
    h.save(&saved, Identity::default(), None).unwrap();
    h.request_stop();
    assert_eq!(run.join().unwrap().unwrap(), VmExit::Stopped);
    drop((console, h));

    // --- A new VM on the pool from the save: the same memory, and it runs on.
    let from = RestoreFrom::dir(&saved).unwrap();
    let (vm, ours) = on_the_pool(|| {
        let (config, ours) = config();
        Vm::restore(config, &from)
            .map(|vm| (vm, ours))
            .map_err(|e| e.to_string())
    });
    let h = vm.handle();
    assert_eq!(h.ram_kind(), RamKind::HugeTlb);
    let mut console = ProbeConsole::new(ours.try_clone().unwrap(), ours);
    let run = std::thread::spawn(move || vm.run());
    h.resume().unwrap();
    assert_eq!(sum(&mut console, "16 48"), filled);
    assert_eq!(console.command("MEM VERIFY 16 16 5", T).unwrap(), "OK");

    // --- A snapshot, a change, and an in-place apply back to the snapshot (its writes go
    // through the mapping: the pool's file takes no pwrite).
    let snap = dir.path().join("snap");
    let opts = LiveSaveOptions {
        then: AfterSave::Resume,
        ..Default::default()
    };
    h.save_live(&snap, Identity::default(), None, &opts)
        .unwrap();
    assert_eq!(console.command("MEM FILL 20 8 6", T).unwrap(), "OK");
    assert_ne!(sum(&mut console, "16 48"), filled);
    let r = h.apply_in_place(&snap, &ApplyOptions::default()).unwrap();
    assert!(r.tracked, "{r:?}");
    assert_eq!(sum(&mut console, "16 48"), filled);
    assert_eq!(console.command("MEM VERIFY 16 16 5", T).unwrap(), "OK");
    h.request_stop();
    assert_eq!(run.join().unwrap().unwrap(), VmExit::Stopped);
}
