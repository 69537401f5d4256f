//! In-place apply of a save to the VM that runs (docs/vm-state.md, "In-place apply"): a
//! 2-vCPU probe with a disk and a NIC is snapshotted live while it rewrites memory; after the
//! snapshot the guest rewrites more memory and a virtio-blk read lands in guest RAM (written by
//! the VMM, not the guest); the apply makes every byte of guest RAM the snapshot's again, the
//! pass counter continues from the saved value, serial, disk, NIC and both vCPUs work. Applied
//! twice (both times copying only the changed pages), then after a later snapshot moved the
//! tracking away (every page compared), then tracked again. A save that does not fit is refused
//! with the VM running on; a save whose memory fails its checksum stops the VM (never runs it
//! on memory that is neither its own nor the save's).
//!
//! The same with the NIC a switch port served over vhost-user (what every vireod NIC is): the
//! switch writes received frames into guest RAM from its own thread, so the tracked apply must
//! find those pages in the back end's share of the dirty log; after each apply frames flow both
//! ways again (the probe echoes numbered frames through the switch), including after an apply
//! with frames arriving while it happens.

use crate::common;

use common::{read, wait_above};

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_block::RawFile;
use vireo_netport::{channel_pair, ChannelPort, FramePort};
use vireo_probe_image::{probe_elf, ProbeConsole};
use vireo_vmm::state::Identity;
use vireo_vmm::vhost_user_net::VhostUserNet;
use vireo_vmm::{
    AfterApply, AfterSave, ApplyOptions, ConsoleConfig, LiveSaveOptions, StateError, VirtioSlot,
    Vm, VmConfig, VmExit, VmHandle,
};
use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::vhost_user::VhostUserServer;
use vireo_vswitch::{PortConfig, Switch, SwitchConfig};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const MEM: u64 = 64 * MIB;
const T: Duration = Duration::from_secs(30);
const PASSES: u64 = 0x80000 + 8;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
/// The host's end of the switch, which the probe echoes to.
const MAC_HOST: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x57];
/// The 2-vCPU tests run one at a time: two such probes at once on the project's 2 cores (with
/// other load) starve an AP past the probe's 50 ms heartbeat window, and `CPUS` then answers
/// "stalled" after an apply that did nothing wrong (seen with both running in parallel).
static TWO_VCPU_PROBES: Mutex<()> = Mutex::new(());

/// Stay paused (to compare RAM), keeping the changes tracked.
const TRACKED: ApplyOptions = ApplyOptions {
    then: AfterApply::StayPaused,
    track: true,
};

struct Machine {
    h: VmHandle,
    console: ProbeConsole,
    run: std::thread::JoinHandle<vireo_vmm::error::Result<VmExit>>,
    /// The in-VMM NIC's other end (none for a switch port: the switch holds that).
    _host_port: Option<ChannelPort>,
}

/// A probe with a disk and an in-VMM NIC.
fn boot(disk: &Path, mem: u64) -> Machine {
    let (guest_port, host_port) = channel_pair("guest", "host").unwrap();
    let mut m = boot_with(disk, mem, VirtioSlot::net(Arc::new(guest_port), MAC));
    m._host_port = Some(host_port);
    m
}

/// A probe with a disk and `nic`.
fn boot_with(disk: &Path, mem: u64, nic: VirtioSlot) -> Machine {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(probe_elf(), mem, 2);
    config.console = ConsoleConfig::Stream(theirs);
    let backend = Arc::new(RawFile::open(disk, false).unwrap());
    config.devices.push(VirtioSlot {
        device: Box::new(vireo_virtio::Block::new(backend.clone())),
        flush_on_exit: Some(backend),
    });
    config.devices.push(nic);
    let vm = Vm::new(config).unwrap();
    let h = vm.handle();
    let mut console = ProbeConsole::new(ours.try_clone().unwrap(), ours);
    let run = std::thread::spawn(move || vm.run());
    console.wait_ready(T).unwrap();
    Machine {
        h,
        console,
        run,
        _host_port: None,
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
    let _one = TWO_VCPU_PROBES.lock().unwrap_or_else(|p| p.into_inner());
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
    let _one = TWO_VCPU_PROBES.lock().unwrap_or_else(|p| p.into_inner());
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

/// A switch with two ports: the VM's, served over vhost-user at `socket`, and the host's.
struct SwitchedNic {
    rt: SwitchRuntime,
    server: VhostUserServer,
    host: Arc<ChannelPort>,
}

impl SwitchedNic {
    fn start(socket: &Path) -> SwitchedNic {
        let mut sw = Switch::new(SwitchConfig::private("kvm-apply-nic")).unwrap();
        let p_vm = sw.add_port(PortConfig::access("vm", 1)).unwrap();
        let p_host = sw.add_port(PortConfig::access("host", 1)).unwrap();
        let rt = SwitchRuntime::start(Arc::new(Mutex::new(sw))).unwrap();
        let (port, server) = VhostUserServer::listen(socket, "vm").unwrap();
        rt.attach(p_vm, port);
        let (host_sw, host) = channel_pair("host-sw", "host").unwrap();
        rt.attach(p_host, Arc::new(host_sw));
        SwitchedNic {
            rt,
            server,
            host: Arc::new(host),
        }
    }

    fn stop(self) {
        self.server.stop().unwrap();
        self.rt.stop().unwrap();
    }
}

/// Frame `seq` of round `round`, from the host to the VM.
fn numbered_frame(round: u8, seq: u64) -> Vec<u8> {
    let mut f = [MAC, MAC_HOST].concat();
    f.extend_from_slice(&[0x88, 0xb5, round]);
    f.extend_from_slice(&seq.to_le_bytes());
    f.resize(64, 0);
    f
}

/// Sends frames 0..n of `round` into the switch (waiting while the host port's queue is full).
fn send_round(host: &ChannelPort, round: u8, n: u64) {
    for seq in 0..n {
        let deadline = Instant::now() + T;
        while let Err(e) = host.send(&numbered_frame(round, seq)) {
            assert!(Instant::now() < deadline, "sending frame {seq}: {e}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The probe echoes `n` numbered frames of `round` from the host back through the switch; the
/// host gets every one, MACs swapped, in order. The probe must have no other frame waiting:
/// it echoes the oldest first and stops after `n`.
fn echo_round(m: &mut Machine, host: &ChannelPort, round: u8, n: u64) {
    m.console
        .send_line(&format!("NET 0 ECHO {n} 10000"))
        .unwrap();
    send_round(host, round, n);
    let mut got = Vec::new();
    let mut other = 0;
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + T;
    while (got.len() as u64) < n {
        assert!(
            Instant::now() < deadline,
            "round {round}: {} of {n} echoes came back ({other} other frames): {got:?}",
            got.len()
        );
        let Some(len) = host.recv(&mut buf).unwrap() else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let f = &buf[..len];
        if len >= 23 && f[..6] == MAC_HOST && f[6..12] == MAC && f[12..15] == [0x88, 0xb5, round] {
            got.push(u64::from_le_bytes(f[15..23].try_into().unwrap()));
        } else {
            other += 1;
        }
    }
    assert_eq!(got, (0..n).collect::<Vec<_>>(), "round {round}");
    assert_eq!(m.console.answer(T).unwrap(), format!("OK echoed={n}"));
}

/// Takes every frame waiting for the probe (`NET RECV` until it times out): those in its
/// receive buffers, then any the switch still had on the way (under load its thread lags the
/// sender), never more than the `sent` frames.
fn drain_probe(m: &mut Machine, sent: u64) -> u64 {
    let mut n = 0;
    loop {
        match m.console.command("NET 0 RECV 300", T) {
            Ok(_) => n += 1,
            Err(vireo_probe_image::ProbeError::Err(e)) if e.contains("timeout") => return n,
            Err(e) => panic!("NET 0 RECV: {e}"),
        }
        assert!(n <= sent, "{n} frames received, only {sent} were sent");
    }
}

#[test]
fn kvm_apply_in_place_of_a_vm_on_a_switch_port_reverts_received_frames_and_keeps_the_nic() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let _one = TWO_VCPU_PROBES.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let snap = dir.path().join("snap");
    let sock = dir.path().join("vm.sock");
    let nic = SwitchedNic::start(&sock);
    let host = nic.host.clone();
    let vhost = VhostUserNet::connect(&sock, MAC).unwrap();
    let mut m = boot_with(
        &disk,
        MEM,
        VirtioSlot {
            device: Box::new(vhost),
            flush_on_exit: None,
        },
    );
    assert_eq!(m.cmd("DISK 0 WRITE 0 2048 7"), "OK");
    assert_eq!(m.cmd("DIRTY START 16 8 0"), "OK");
    wait_above(&m.h, PASSES, 0);
    echo_round(&mut m, &host, 1, 16);
    m.snapshot(&snap);

    // After the snapshot the switch writes frames into the probe's receive buffers (nobody
    // takes them) and the probe echoes others: pages only the back end wrote.
    echo_round(&mut m, &host, 2, 8);
    send_round(&host, 3, 24);
    std::thread::sleep(Duration::from_millis(100));
    let r = m.h.apply_in_place(&snap, &TRACKED).unwrap();
    eprintln!("tracked apply: {r:?}");
    assert!(r.tracked && r.tracking_now, "{r:?}");
    // Every byte the switch wrote since the snapshot is the snapshot's again.
    check_and_resume(&mut m, &snap);
    // The 24 frames of round 3 went with the state they arrived in: only round 4 comes back.
    echo_round(&mut m, &host, 4, 16);

    // The default (resume, log off), with frames waiting again.
    send_round(&host, 5, 8);
    std::thread::sleep(Duration::from_millis(50));
    let r = m.h.apply_in_place(&snap, &ApplyOptions::default()).unwrap();
    assert!(r.tracked && !r.tracking_now, "{r:?}");
    echo_round(&mut m, &host, 6, 16);

    // Nothing tracked now: every page compared, the switch's among them.
    send_round(&host, 7, 8);
    std::thread::sleep(Duration::from_millis(50));
    let untracked = ApplyOptions {
        then: AfterApply::StayPaused,
        track: false,
    };
    let r = m.h.apply_in_place(&snap, &untracked).unwrap();
    assert!(!r.tracked && r.pages_compared == MEM / 4096, "{r:?}");
    check_and_resume(&mut m, &snap);
    echo_round(&mut m, &host, 8, 16);

    // Frames arriving all through an apply: some are lost with the state they came in, the
    // rest wait in the probe's buffers; the NIC works afterwards.
    let stop = Arc::new(AtomicBool::new(false));
    let blaster = {
        let (host, stop) = (host.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seq = 0;
            while !stop.load(Ordering::SeqCst) {
                let _ = host.send(&numbered_frame(9, seq));
                seq += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            seq
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    m.h.apply_in_place(&snap, &ApplyOptions::default()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::SeqCst);
    let sent = blaster.join().unwrap();
    let waiting = drain_probe(&mut m, sent);
    eprintln!("{waiting} frames of those sent across the apply were waiting after it");
    let mut buf = [0u8; 2048];
    while host.recv(&mut buf).unwrap().is_some() {}
    echo_round(&mut m, &host, 10, 16);

    // The save of a VM whose NIC had another MAC: the NIC would refuse it, so it is refused
    // before the pause and the VM runs on.
    let other_dir = dir.path().join("other");
    let other_sock = dir.path().join("other.sock");
    let (_other_port, other_server) = VhostUserServer::listen(&other_sock, "other").unwrap();
    let mut other_mac = MAC;
    other_mac[5] ^= 1;
    let other_disk = dir.path().join("other.raw");
    std::fs::File::create(&other_disk)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let other = boot_with(
        &other_disk,
        MEM,
        VirtioSlot {
            device: Box::new(VhostUserNet::connect(&other_sock, other_mac).unwrap()),
            flush_on_exit: None,
        },
    );
    other.snapshot(&other_dir);
    other.stop();
    other_server.stop().unwrap();
    let e =
        m.h.apply_in_place(&other_dir, &ApplyOptions::default())
            .unwrap_err();
    assert!(
        matches!(&e, StateError::Device { source, .. } if source.to_string().contains("MAC")),
        "{e}"
    );
    assert!(!m.h.is_paused());
    echo_round(&mut m, &host, 11, 4);
    assert_eq!(m.cmd("PING"), "OK PONG");
    m.stop();
    nic.stop();
}
