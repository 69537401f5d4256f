//! Guest RAM in 2 MiB host pages (the default, `RamBacking::Huge`): KVM maps the probe's hot set
//! (2 MiB pages in the guest's own page tables) with 2 MiB entries; a live save's dirty log
//! splits them into 4 KiB entries while it is on; an in-place apply that turns the log off gets
//! the 2 MiB entries back (docs/vm-state.md, "In-place apply"). The same steps on a memfd VM
//! end with 4 KiB entries only, which is what the 2 MiB pages are for. Read from KVM's own
//! statistics (`pages_2m`, `pages_4k`), never from timings.

use crate::common;

use common::wait_above;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use vireo_probe_image::{probe_elf, ProbeConsole};
use vireo_vmm::kvm_stats::KvmPageStats;
use vireo_vmm::state::Identity;
use vireo_vmm::{
    AfterSave, ApplyOptions, ConsoleConfig, LiveSaveOptions, RamBacking, Vm, VmConfig, VmExit,
    VmHandle,
};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);
const PASSES: u64 = 0x80000 + 8;
/// The hot set the guest rewrites: 16..32 MiB, eight 2 MiB pages.
const HOT_2M: u64 = 8;

/// KVM's mappings once the guest has made a few more passes over its hot set.
fn settled(h: &VmHandle) -> KvmPageStats {
    let p = wait_above(h, PASSES, common::read(h, PASSES));
    wait_above(h, PASSES, p + 2);
    h.kvm_page_stats().expect("checked at the start")
}

/// Boots, rewrites the hot set, snapshots (log on), applies in place (log off); returns KVM's
/// mappings before the snapshot, while the log is on, and after the apply.
fn run(backing: RamBacking) -> Option<[KvmPageStats; 3]> {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(probe_elf(), 64 * MIB, 1);
    config.console = ConsoleConfig::Stream(theirs);
    config.ram_backing = backing;
    let vm = Vm::new(config).unwrap();
    let h = vm.handle();
    let mut console = ProbeConsole::new(ours.try_clone().unwrap(), ours);
    let run = std::thread::spawn(move || vm.run());
    console.wait_ready(T).unwrap();
    let stats = h.kvm_page_stats().map(|_| {
        for line in ["MEM FILL 16 16 1", "DIRTY START 16 16 0"] {
            assert_eq!(console.command(line, T).unwrap(), "OK", "{line}");
        }
        let before = settled(&h);
        let dir = tempfile::tempdir().unwrap();
        let opts = LiveSaveOptions {
            then: AfterSave::Resume,
            ..Default::default()
        };
        h.save_live(dir.path(), Identity::default(), None, &opts)
            .unwrap();
        assert!(h.tracking_changes(), "the log stays on after the snapshot");
        let logging = settled(&h);
        let r = h
            .apply_in_place(dir.path(), &ApplyOptions::default())
            .unwrap();
        assert!(r.tracked && !r.tracking_now, "{r:?}");
        let after = settled(&h);
        [before, logging, after]
    });
    h.request_stop();
    assert_eq!(run.join().unwrap().unwrap(), VmExit::Stopped);
    stats
}

#[test]
fn kvm_huge_ram_gets_its_2mib_mappings_back_after_the_dirty_log() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm)
        || !vireo_testkit::require(vireo_testkit::Need::Root)
    {
        return;
    }
    let Some([before, logging, after]) = run(RamBacking::Huge) else {
        vireo_testkit::skip_env("KVM_GET_STATS_FD with pages_2m (Linux 5.14+)");
        return;
    };
    eprintln!("huge: before {before:?}, log on {logging:?}, after the apply {after:?}");
    assert!(before.pages_2m >= HOT_2M, "{before:?}");
    assert!(
        logging.pages_2m < before.pages_2m,
        "the log splits the written 2 MiB pages: {before:?} -> {logging:?}"
    );
    assert!(
        after.pages_2m >= HOT_2M,
        "back to 2 MiB after the log went off: {after:?}"
    );

    let [_, _, small] = run(RamBacking::Memfd).expect("stats read a moment ago");
    eprintln!("memfd: after the apply {small:?}");
    assert_eq!(small.pages_2m, 0, "4 KiB host pages map 4 KiB only");
    assert!(small.pages_4k >= HOT_2M * 512, "{small:?}");
}
