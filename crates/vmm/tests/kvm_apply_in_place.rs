//! In-place apply of a save to the VM that runs (docs/vm-state.md, "In-place apply"): a
//! 2-vCPU probe with a disk and a NIC is snapshotted live while it rewrites memory; after the
//! snapshot the guest rewrites more memory and a virtio-blk read lands in guest RAM (written by
//! the VMM, not the guest); the apply makes every byte of guest RAM the snapshot's again, the
//! pass counter continues from the saved value, serial, disk, NIC and both vCPUs work. Applied
//! twice (both times copying only the changed pages), then after a later snapshot moved the
//! tracking away (every page compared), then tracked again. A save that does not fit is refused
//! with the VM running on; a save whose memory fails its checksum stops the VM (never runs it
//! on memory that is neither its own nor the save's).

mod common;

use common::{read, wait_above};

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vireo_block::RawFile;
use vireo_netport::{channel_pair, ChannelPort};
use vireo_probe_image::{probe_elf, ProbeConsole};
use vireo_vmm::state::Identity;
use vireo_vmm::{
    AfterApply, AfterSave, ApplyOptions, ConsoleConfig, LiveSaveOptions, StateError, VirtioSlot,
    Vm, VmConfig, VmExit, VmHandle,
};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const MEM: u64 = 64 * MIB;
const T: Duration = Duration::from_secs(30);
const PASSES: u64 = 0x80000 + 8;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
/// Stay paused (to compare RAM), keeping the changes tracked.
const TRACKED: ApplyOptions = ApplyOptions {
    then: AfterApply::StayPaused,
    track: true,
};

struct Machine {
    h: VmHandle,
    console: ProbeConsole,
    run: std::thread::JoinHandle<vireo_vmm::error::Result<VmExit>>,
    _host_port: ChannelPort,
}

fn boot(disk: &Path, mem: u64) -> Machine {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(probe_elf(), mem, 2);
    config.console = ConsoleConfig::Stream(theirs);
    let backend = Arc::new(RawFile::open(disk, false).unwrap());
    config.devices.push(VirtioSlot {
        device: Box::new(vireo_virtio::Block::new(backend.clone())),
        flush_on_exit: Some(backend),
    });
    let (guest_port, host_port) = channel_pair("guest", "host").unwrap();
    config
        .devices
        .push(VirtioSlot::net(Arc::new(guest_port), MAC));
    let vm = Vm::new(config).unwrap();
    let h = vm.handle();
    let mut console = ProbeConsole::new(ours.try_clone().unwrap(), ours);
    let run = std::thread::spawn(move || vm.run());
    console.wait_ready(T).unwrap();
    Machine {
        h,
        console,
        run,
        _host_port: host_port,
    }
}

impl Machine {
    fn cmd(&mut self, line: &str) -> String {
        self.console
            .command(line, T)
            .unwrap_or_else(|e| panic!("`{line}`: {e}"))
    }

    fn snapshot(&self, dir: &Path) {
        let opts = LiveSaveOptions {
            then: AfterSave::Resume,
            ..Default::default()
        };
        self.h
            .save_live(dir, Identity::default(), None, &opts)
            .unwrap();
        assert!(!self.h.is_paused());
        assert!(self.h.tracking_changes(), "a snapshot tracks its changes");
    }

    fn stop(self) {
        self.h.request_stop();
        assert_eq!(self.run.join().unwrap().unwrap(), VmExit::Stopped);
    }
}

/// Every byte of guest RAM equals the save's `memory.bin`; returns the saved pass counter.
fn assert_ram_is(h: &VmHandle, save: &Path) -> u64 {
    let file = std::fs::File::open(save.join(vireo_vmm::MEMORY_FILE)).unwrap();
    let (mut want, mut got) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut at = 0;
    while at < MEM {
        file.read_exact_at(&mut want, at).unwrap();
        h.memory().read_slice(&mut got, GuestAddress(at)).unwrap();
        if want != got {
            let i = want.iter().zip(&got).position(|(a, b)| a != b).unwrap();
            panic!(
                "guest RAM differs from {} at {:#x}",
                save.display(),
                at + i as u64
            );
        }
        at += MIB;
    }
    let mut passes = [0u8; 8];
    file.read_exact_at(&mut passes, PASSES).unwrap();
    u64::from_le_bytes(passes)
}

/// After an apply that stayed paused: RAM is the save's, then the guest carries on from it.
fn check_and_resume(m: &mut Machine, save: &Path) {
    assert!(m.h.is_paused());
    let saved = assert_ram_is(&m.h, save);
    assert_eq!(read(&m.h, PASSES), saved, "the counter is the saved one");
    m.h.resume().unwrap();
    wait_above(&m.h, PASSES, saved);
    assert_eq!(m.cmd("PING"), "OK PONG");
    assert_eq!(m.cmd("DISK 0 VERIFY 0 2048 7"), "OK");
    assert_eq!(m.cmd("NET 0 MAC"), "OK mac=52:54:00:12:34:56");
    assert_eq!(m.cmd("CPUS"), "OK online=2");
}

#[test]
fn kvm_apply_in_place_brings_ram_and_state_back_to_the_snapshot() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let (snap_a, snap_b) = (dir.path().join("a"), dir.path().join("b"));
    let mut m = boot(&disk, MEM);
    assert_eq!(m.cmd("DISK 0 WRITE 0 2048 7"), "OK");
    assert_eq!(m.cmd("DISK 0 WRITE 4096 2048 8"), "OK");
    assert_eq!(m.cmd("DISK 0 VERIFY 4096 2048 8"), "OK");
    assert_eq!(m.cmd("MEM FILL 16 16 1"), "OK");
    assert_eq!(m.cmd("DIRTY START 16 8 0"), "OK");
    let p = wait_above(&m.h, PASSES, 0);
    wait_above(&m.h, PASSES, p);
    m.snapshot(&snap_a);

    // After the snapshot: the guest rewrites memory, and the disk read's data lands in the
    // probe's buffers through the VMM (pattern 7 where pattern 8 was read before).
    assert_eq!(m.cmd("MEM FILL 24 8 2"), "OK");
    assert_eq!(m.cmd("DISK 0 VERIFY 0 2048 7"), "OK");
    std::thread::sleep(Duration::from_millis(50));
    let r = m.h.apply_in_place(&snap_a, &TRACKED).unwrap();
    eprintln!("first apply: {r:?}");
    assert!(r.tracked && r.tracking_now, "{r:?}");
    assert_eq!(r.pages_compared, 0);
    assert!(r.pages_copied >= 2048, "the 8 MiB MEM FILL at least: {r:?}");
    assert!(r.pages_copied < MEM / 4096, "only what changed: {r:?}");
    check_and_resume(&mut m, &snap_a);

    // Applied again after more changes: again only the changed pages.
    assert_eq!(m.cmd("MEM FILL 40 4 3"), "OK");
    let r = m.h.apply_in_place(&snap_a, &TRACKED).unwrap();
    eprintln!("second apply: {r:?}");
    assert!(r.tracked && r.pages_copied >= 1024, "{r:?}");
    check_and_resume(&mut m, &snap_a);

    // A later snapshot takes the tracking: applying A now compares every page.
    assert_eq!(m.cmd("MEM FILL 44 4 4"), "OK");
    m.snapshot(&snap_b);
    assert_eq!(m.cmd("MEM FILL 24 4 5"), "OK");
    let r = m.h.apply_in_place(&snap_a, &TRACKED).unwrap();
    eprintln!("apply of an untracked snapshot: {r:?}");
    assert!(!r.tracked && r.tracking_now, "{r:?}");
    assert_eq!(r.pages_compared, MEM / 4096);
    assert!(r.pages_copied >= 1024 + 1024, "{r:?}");
    check_and_resume(&mut m, &snap_a);
    // ... and it is tracked from then on.
    assert_eq!(m.cmd("MEM FILL 24 4 6"), "OK");
    // The default: resume, and no tracking afterwards (the log goes off).
    let r =
        m.h.apply_in_place(&snap_a, &ApplyOptions::default())
            .unwrap();
    assert!(r.tracked && !r.tracking_now, "{r:?}");
    assert!(!m.h.is_paused(), "Resume runs the VM");
    assert!(!m.h.tracking_changes());
    assert_eq!(m.cmd("PING"), "OK PONG");
    // B is applied as well (compared), and the disk read in between is undone too.
    let untracked = ApplyOptions {
        then: AfterApply::StayPaused,
        track: false,
    };
    let r = m.h.apply_in_place(&snap_b, &untracked).unwrap();
    assert!(!r.tracked && !r.tracking_now, "{r:?}");
    check_and_resume(&mut m, &snap_b);
    // ... and A after it, with nothing tracked at all.
    assert_eq!(m.cmd("MEM FILL 24 4 7"), "OK");
    let r = m.h.apply_in_place(&snap_a, &untracked).unwrap();
    assert!(!r.tracked && r.pages_copied > 0, "{r:?}");
    check_and_resume(&mut m, &snap_a);

    // A save of another machine is refused before anything changes; the VM runs on.
    let other_dir = dir.path().join("other");
    let other_disk = dir.path().join("other.raw");
    std::fs::File::create(&other_disk)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let other = boot(&other_disk, 32 * MIB);
    other.snapshot(&other_dir);
    other.stop();
    let e =
        m.h.apply_in_place(&other_dir, &ApplyOptions::default())
            .unwrap_err();
    assert!(matches!(e, StateError::Mismatch(_)), "{e}");
    assert!(!m.h.is_paused());
    assert_eq!(m.cmd("PING"), "OK PONG");
    m.stop();
}

#[test]
fn kvm_apply_in_place_of_a_damaged_save_stops_the_vm_instead_of_running_it() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(MIB).unwrap();
    let snap = dir.path().join("snap");
    let mut m = boot(&disk, MEM);
    assert_eq!(m.cmd("MEM FILL 16 8 1"), "OK");
    m.snapshot(&snap);
    // One flipped byte in a page the guest filled; its checksum no longer matches.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(snap.join(vireo_vmm::MEMORY_FILE))
        .unwrap();
    let at = 20 * MIB + 123;
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    drop(file);
    // Untracked: every page is read, the damaged one among them.
    let opts = ApplyOptions {
        then: AfterApply::Resume,
        track: false,
    };
    m.h.stop_dirty_log().unwrap();
    let e = m.h.apply_in_place(&snap, &opts).unwrap_err();
    assert!(
        matches!(&e, StateError::Corrupt { why, .. } if why.contains("0x1400000")),
        "{e}"
    );
    // The guest never runs on memory that is neither its own nor the save's.
    let exit = m.run.join().unwrap().unwrap();
    assert!(
        matches!(&exit, VmExit::Error(why) if why.contains("in-place apply")),
        "{exit:?}"
    );
}
