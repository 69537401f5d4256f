//! Disk hot add and remove on a running probe guest: a disk attached into a reserved slot shows
//! up after `RESCAN`, takes a pattern the image file then holds, and is gone from the guest after
//! it is detached; the slot takes another disk; a boot disk can be removed too; bad requests
//! (no free slot, empty or unknown slot) fail and change nothing.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vireo_block::{BlockBackend, RawFile};
use vireo_probe_image::{pattern, probe_elf, ProbeConsole};
use vireo_vmm::{ConsoleConfig, HotplugError, VirtioSlot, Vm, VmConfig, VmExit};

const T: Duration = Duration::from_secs(60);
const DISK_BYTES: usize = 1 << 20;

fn raw(path: &Path) -> Arc<dyn BlockBackend> {
    std::fs::write(path, vec![0u8; DISK_BYTES]).unwrap();
    Arc::new(RawFile::open(path, false).unwrap())
}

fn block(backend: &Arc<dyn BlockBackend>, serial: &str) -> vireo_virtio::Block {
    vireo_virtio::Block::new(backend.clone()).with_serial(serial)
}

fn field<'a>(answer: &'a str, key: &str) -> &'a str {
    vireo_probe_image::console::field(answer, key).unwrap_or_else(|| panic!("{key} in {answer}"))
}

#[test]
fn kvm_hot_add_write_and_remove_disks() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let boot = raw(&dir.path().join("boot.img"));
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(probe_elf(), 64 << 20, 1);
    config.console = ConsoleConfig::Stream(theirs);
    config.devices.push(VirtioSlot {
        device: Box::new(block(&boot, "BOOT")),
        flush_on_exit: Some(boot.clone()),
    });
    config.disk_slots = 3;
    let vm = Vm::new(config).unwrap();
    let h = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let mut c = ProbeConsole::new(ours.try_clone().unwrap(), ours);
    c.wait_ready(T).unwrap();

    // Three slots, the boot disk in the first; the empty ones are not disks to the guest.
    let slots = h.disk_slots();
    assert_eq!(slots.len(), 3);
    assert!(slots[0].disk.is_some() && slots[1].disk.is_none() && slots[2].disk.is_none());
    assert_eq!(field(&c.command("INFO", T).unwrap(), "disks"), "1");

    // Hot add: the first free slot, disk 1 to the guest after a rescan.
    let hot_path = dir.path().join("hot.img");
    let hot = raw(&hot_path);
    let at = h.attach_disk(block(&hot, "HOT1"), hot.clone()).unwrap();
    assert_eq!((at.slot, at.index), (1, 1));
    assert_eq!(
        field(&c.command("INFO", T).unwrap(), "disks"),
        "1",
        "before RESCAN"
    );
    assert_eq!(
        c.command("RESCAN", T).unwrap(),
        "OK disks=2 added=1 removed=0"
    );
    assert_eq!(field(&c.command("INFO", T).unwrap(), "disks"), "2");
    assert_eq!(c.command("DISK 1 ID", T).unwrap(), "OK id=HOT1");
    assert_eq!(c.command("DISK 0 ID", T).unwrap(), "OK id=BOOT");
    assert_eq!(
        c.command("DISK 1 INFO", T).unwrap(),
        format!("OK sectors={} ro=0 blk_size=512", DISK_BYTES / 512)
    );
    c.command("DISK 1 WRITE 8 64 77", T).unwrap();
    c.command("DISK 1 VERIFY 8 64 77", T).unwrap();
    // A rescan with nothing changed keeps the disk as it is.
    assert_eq!(
        c.command("RESCAN", T).unwrap(),
        "OK disks=2 added=0 removed=0"
    );
    c.command("DISK 1 VERIFY 8 64 77", T).unwrap();

    // Hot remove: flushed, let go, gone from the guest.
    let backend = h.detach_disk(1).unwrap();
    assert_eq!(backend.id(), hot.id());
    drop((backend, hot));
    assert!(h.disk_slots()[1].disk.is_none());
    // Before the guest rescans, its old driver finds an empty window: 0 sectors.
    assert!(matches!(
        c.command("DISK 1 WRITE 0 1 1", T),
        Err(vireo_probe_image::ProbeError::Err(e)) if e == "range"
    ));
    assert_eq!(
        c.command("RESCAN", T).unwrap(),
        "OK disks=1 added=0 removed=1"
    );
    assert!(matches!(
        c.command("DISK 1 INFO", T),
        Err(vireo_probe_image::ProbeError::Err(e)) if e == "no such disk"
    ));
    let bytes = std::fs::read(&hot_path).unwrap();
    assert_eq!(
        pattern::verify(&bytes[8 * 512..72 * 512], 77, 8 * 512),
        None
    );
    assert!(bytes[..8 * 512].iter().all(|&b| b == 0));
    assert!(bytes[72 * 512..].iter().all(|&b| b == 0));

    // Bad requests change nothing.
    assert!(matches!(h.detach_disk(1), Err(HotplugError::EmptySlot(1))));
    assert!(matches!(
        h.detach_disk(7),
        Err(HotplugError::NoSuchSlot { slot: 7, slots: 3 })
    ));
    let a = raw(&dir.path().join("a.img"));
    let b = raw(&dir.path().join("b.img"));
    let extra = raw(&dir.path().join("extra.img"));
    assert_eq!(h.attach_disk(block(&a, "A"), a.clone()).unwrap().slot, 1);
    assert_eq!(h.attach_disk(block(&b, "B"), b.clone()).unwrap().slot, 2);
    assert!(matches!(
        h.attach_disk(block(&extra, "X"), extra.clone()),
        Err(HotplugError::NoFreeSlot(3))
    ));
    assert_eq!(
        c.command("RESCAN", T).unwrap(),
        "OK disks=3 added=2 removed=0"
    );
    assert_eq!(c.command("DISK 1 ID", T).unwrap(), "OK id=A");
    assert_eq!(c.command("DISK 2 ID", T).unwrap(), "OK id=B");

    // A boot disk can go too; the disks behind it move up one index after the rescan, and the
    // slot it frees is the next one filled.
    c.command("DISK 0 WRITE 0 8 5", T).unwrap();
    h.detach_disk(0).unwrap();
    assert_eq!(
        c.command("RESCAN", T).unwrap(),
        "OK disks=2 added=0 removed=1"
    );
    assert_eq!(c.command("DISK 0 ID", T).unwrap(), "OK id=A");
    c.command("DISK 0 WRITE 0 8 9", T).unwrap();
    let at = h.attach_disk(block(&extra, "X"), extra.clone()).unwrap();
    assert_eq!((at.slot, at.index), (0, 0));
    assert_eq!(
        c.command("RESCAN", T).unwrap(),
        "OK disks=3 added=1 removed=0"
    );
    assert_eq!(c.command("DISK 0 ID", T).unwrap(), "OK id=X");
    c.command("DISK 1 VERIFY 0 8 9", T).unwrap();
    let boot_bytes = std::fs::read(dir.path().join("boot.img")).unwrap();
    assert_eq!(pattern::verify(&boot_bytes[..8 * 512], 5, 0), None);

    // Detach while paused, then resume: the guest carries on.
    h.pause().unwrap();
    h.detach_disk(2).unwrap();
    h.resume().unwrap();
    assert_eq!(
        c.command("RESCAN", T).unwrap(),
        "OK disks=2 added=0 removed=1"
    );

    c.send_line("POWEROFF 3").unwrap();
    assert_eq!(runner.join().unwrap().unwrap(), VmExit::PowerOff(3));
    // The VM has ended: nothing goes in or out any more.
    assert!(matches!(h.detach_disk(0), Err(HotplugError::NotRunning)));
    assert!(matches!(
        h.attach_disk(block(&b, "B"), b.clone()),
        Err(HotplugError::NotRunning)
    ));
}
