//! Dirty-page tracking on a running probe: the fetched set holds exactly the pages the guest
//! wrote (MEM FILL) plus the pages the VMM wrote through guest memory, and nothing else outside
//! the probe's own first 8 MiB.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use vireo_probe_image::{probe_elf, ProbeConsole};
use vireo_vmm::dirty::LogMode;
use vireo_vmm::{ConsoleConfig, Vm, VmConfig, VmExit};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const PROBE_OWN: u64 = 8 * MIB;
const T: Duration = Duration::from_secs(60);

fn outside_probe(pages: Vec<u64>) -> Vec<u64> {
    pages.into_iter().filter(|&p| p >= PROBE_OWN).collect()
}

#[test]
fn kvm_dirty_log_reports_guest_and_vmm_writes() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(probe_elf(), 64 * MIB, 1);
    config.console = ConsoleConfig::Stream(theirs);
    let vm = Vm::new(config).unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let mut console = ProbeConsole::new(ours.try_clone().unwrap(), ours);
    console.wait_ready(T).unwrap();

    handle.start_dirty_log().unwrap();
    handle.fetch_and_clear_dirty().unwrap();
    console.command("MEM FILL 16 2 5", T).unwrap();
    // What a device does when it DMAs into guest memory: write through GuestMemory.
    handle
        .memory()
        .write_obj(0xfeed_u64, GuestAddress(40 * MIB + 8))
        .unwrap();
    let dirty = handle.fetch_and_clear_dirty().unwrap();
    let mut want: Vec<u64> = (16 * MIB..18 * MIB).step_by(4096).collect();
    want.push(40 * MIB);
    assert_eq!(outside_probe(dirty.pages()), want);

    // Nothing new outside the probe's area: the next fetch is empty there.
    console.command("PING", T).unwrap();
    assert_eq!(
        outside_probe(handle.fetch_and_clear_dirty().unwrap().pages()),
        Vec::<u64>::new()
    );

    // A guest checksum confirms the guest sees the VMM's write.
    let sum = console.command("MEM SUM 40 1", T).unwrap();
    let mut page = vec![0u8; MIB as usize];
    handle
        .memory()
        .read_slice(&mut page, GuestAddress(40 * MIB))
        .unwrap();
    let want_sum = format!("{:016x}", vireo_probe_image::pattern::fnv1a64(&page));
    assert!(sum.ends_with(&want_sum), "{sum} vs {want_sum}");

    handle.stop_dirty_log().unwrap();
    assert!(handle.fetch_and_clear_dirty().is_err(), "fetch after stop");
    console.send_line("POWEROFF 9").unwrap();
    assert_eq!(runner.join().unwrap().unwrap(), VmExit::PowerOff(9));
}

/// Manual protection (`LogMode::ClearAsCopied`, what a live migration uses): a fetch
/// re-protects nothing (the same pages come back until cleared), and `clear_dirty_region`
/// clears exactly the pages and range asked for, after which only the guest's new writes are
/// reported there.
#[test]
fn kvm_manual_dirty_protect_clears_only_what_is_copied() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(probe_elf(), 64 * MIB, 1);
    config.console = ConsoleConfig::Stream(theirs);
    let vm = Vm::new(config).unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let mut console = ProbeConsole::new(ours.try_clone().unwrap(), ours);
    console.wait_ready(T).unwrap();

    handle.start_dirty_log_in(LogMode::ClearAsCopied).unwrap();
    assert_eq!(
        outside_probe(handle.fetch_and_clear_dirty().unwrap().pages()),
        Vec::<u64>::new()
    );
    console.command("MEM FILL 16 4 5", T).unwrap();
    console.command("MEM FILL 24 2 6", T).unwrap();
    let written: Vec<u64> = (16 * MIB..20 * MIB)
        .chain(24 * MIB..26 * MIB)
        .step_by(4096)
        .collect();
    let dirty = handle.fetch_and_clear_dirty().unwrap();
    assert_eq!(outside_probe(dirty.pages()), written);
    assert_eq!(
        outside_probe(handle.fetch_and_clear_dirty().unwrap().pages()),
        written,
        "a fetch clears nothing in manual mode"
    );

    // Clear 16..18 MiB and, of the bitmap's pages, only 24..25 MiB: the rest stays dirty.
    handle
        .clear_dirty_region(Some(&dirty), 16 * MIB, 2 * MIB)
        .unwrap();
    handle
        .clear_dirty_region(Some(&dirty), 24 * MIB, MIB)
        .unwrap();
    let left: Vec<u64> = (18 * MIB..20 * MIB)
        .chain(25 * MIB..26 * MIB)
        .step_by(4096)
        .collect();
    assert_eq!(
        outside_probe(handle.fetch_and_clear_dirty().unwrap().pages()),
        left
    );

    // The guest writes a cleared range again: its pages come back.
    console.command("MEM FILL 16 1 7", T).unwrap();
    let mut again: Vec<u64> = (16 * MIB..17 * MIB).step_by(4096).collect();
    again.extend(&left);
    assert_eq!(
        outside_probe(handle.fetch_and_clear_dirty().unwrap().pages()),
        again
    );

    handle.stop_dirty_log().unwrap();
    // The classic mode again: a fetch clears.
    handle.start_dirty_log().unwrap();
    handle.fetch_and_clear_dirty().unwrap();
    console.command("PING", T).unwrap();
    assert_eq!(
        outside_probe(handle.fetch_and_clear_dirty().unwrap().pages()),
        Vec::<u64>::new()
    );
    handle.stop_dirty_log().unwrap();
    console.send_line("POWEROFF 9").unwrap();
    assert_eq!(runner.join().unwrap().unwrap(), VmExit::PowerOff(9));
}
