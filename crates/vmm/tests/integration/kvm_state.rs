//! Save and restore for real (docs/vm-state.md): a 2-vCPU probe with a disk and a NIC does disk
//! I/O, network I/O and the DIRTY workload, is paused and saved (state file + memory file),
//! the old VM ends, and a NEW VM (new KVM VM fd, memory loaded from the file) restored from
//! the save carries on: it answers commands, its pass counter and the AP's heartbeat continue,
//! its memory and disk verify, disk I/O and the NIC work.

use crate::common;

use common::{read, wait_above};

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_block::RawFile;
use vireo_netport::{channel_pair, ChannelPort, FramePort};
use vireo_probe_image::{probe_elf, ProbeConsole};
use vireo_vmm::state::Identity;
use vireo_vmm::{ConsoleConfig, RestoreFrom, VirtioSlot, Vm, VmConfig, VmExit};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);
const STATUS_PAGE: u64 = 0x80000;
const PASSES: u64 = STATUS_PAGE + 8;
const HEARTBEAT_AP1: u64 = STATUS_PAGE + 64 + 8;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];

/// An Ethernet frame from the host to the guest's MAC with `tag` in its payload.
fn frame(tag: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend(std::iter::repeat_n(tag, 60));
    f
}

struct Machine {
    vm: Vm,
    console: ProbeConsole,
    host_port: ChannelPort,
}

/// What the test keeps of a VM's configuration.
struct Parts {
    console: UnixStream,
    host_port: ChannelPort,
    disk: Arc<vireo_virtio::block::BlockCounters>,
}

/// The VM's configuration: what a restore must match (memory, vCPUs, device order, MAC).
fn config(disk: &Path) -> (VmConfig, Parts) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(probe_elf(), 64 * MIB, 2);
    config.console = ConsoleConfig::Stream(theirs);
    let backend = Arc::new(RawFile::open(disk, false).unwrap());
    let block = vireo_virtio::Block::new(backend.clone());
    let counters = block.counters();
    config.devices.push(VirtioSlot {
        device: Box::new(block),
        flush_on_exit: Some(backend),
    });
    let (guest_port, host_port) = channel_pair("guest", "host").unwrap();
    config
        .devices
        .push(VirtioSlot::net(Arc::new(guest_port), MAC));
    let parts = Parts {
        console: ours,
        host_port,
        disk: counters,
    };
    (config, parts)
}

fn boot(disk: &Path) -> Machine {
    let (
        config,
        Parts {
            console: ours,
            host_port,
            ..
        },
    ) = config(disk);
    let vm = Vm::new(config).unwrap();
    let console = ProbeConsole::new(ours.try_clone().unwrap(), ours);
    Machine {
        vm,
        console,
        host_port,
    }
}

#[test]
fn kvm_saved_probe_restores_into_a_new_vm_and_carries_on() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let save_dir = dir.path().join("save");

    // --- The original VM: boot, I/O, workload, pause, save, end.
    let Machine {
        vm,
        mut console,
        host_port,
    } = boot(&disk);
    let h = vm.handle();
    let run = std::thread::spawn(move || vm.run());
    console.wait_ready(T).unwrap();
    console.command("DISK 0 WRITE 0 256 7", T).unwrap();
    console.command("DISK 0 VERIFY 0 256 7", T).unwrap();
    // A first save into the same directory, then the VM runs on: the later save replaces it.
    console.command("MEM FILL 24 8 8", T).unwrap();
    h.pause().unwrap();
    h.save(&save_dir, Identity::default(), None).unwrap();
    h.resume().unwrap();
    console.command("MEM FILL 24 8 9", T).unwrap();
    let sum_before = console.command("MEM SUM 24 8", T).unwrap();
    // Rx ring positions move: frames in, some taken by the probe, one left in its buffers.
    for tag in 1..=3 {
        host_port.send(&frame(tag)).unwrap();
    }
    for tag in 1..=2 {
        let got = console.command("NET 0 RECV 5000", T).unwrap();
        assert!(got.ends_with(&vireo_probe_image::console::encode_hex(&frame(tag))));
    }
    console.command("DIRTY START 16 8 0", T).unwrap();
    let passes = wait_above(&h, PASSES, 0);
    wait_above(&h, PASSES, passes);
    wait_above(&h, HEARTBEAT_AP1, read(&h, HEARTBEAT_AP1));
    // Tx ring positions move too, and the last write is in flight around the pause.
    console
        .command("NET 0 SEND ffffffffffff52540012345688b5aabbccdd", T)
        .unwrap();
    console.send_line("DISK 0 WRITE 1000 64 11").unwrap();
    let write_answer = console.answer(T).unwrap();
    assert!(write_answer.starts_with("OK"), "{write_answer}");

    h.pause().unwrap();
    let passes_saved = read(&h, PASSES);
    let beat_saved = read(&h, HEARTBEAT_AP1);
    // Saving refuses a running VM; this one is paused.
    h.save(
        &save_dir,
        Identity {
            id: Some("vm-1".into()),
            name: Some("probe".into()),
        },
        Some(r#"{"name":"probe"}"#.into()),
    )
    .unwrap();
    // The save did not disturb the paused VM.
    assert_eq!(read(&h, PASSES), passes_saved);
    h.request_stop();
    assert_eq!(run.join().unwrap().unwrap(), VmExit::Stopped);
    // The old VM's devices (and its disk's lock) go with its last handle.
    drop((console, host_port, h));

    // --- A new VM from the save.
    let from = RestoreFrom::dir(&save_dir).unwrap();
    assert_eq!(from.state.identity.id.as_deref(), Some("vm-1"));
    assert_eq!(from.state.vcpus.len(), 2);
    let (config, parts) = config(&disk);
    let (ours, host_port, disk_counters) = (parts.console, parts.host_port, parts.disk);
    let vm = Vm::restore(config, &from).unwrap();
    let h = vm.handle();
    assert!(h.is_paused());
    let mut console = ProbeConsole::new(ours.try_clone().unwrap(), ours);
    let run = std::thread::spawn(move || vm.run());
    // Paused: the restored memory is as saved and nothing runs.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(read(&h, PASSES), passes_saved);
    h.resume().unwrap();

    // The workload carries on where it was: its counter and the AP's heartbeat continue.
    let p = wait_above(&h, PASSES, passes_saved);
    assert!(
        p < passes_saved + 1000,
        "counter jumped from {passes_saved} to {p}"
    );
    wait_above(&h, HEARTBEAT_AP1, beat_saved);
    assert_eq!(console.command("PING", T).unwrap(), "OK PONG");
    let stop = console.command("DIRTY STOP", T).unwrap();
    assert!(stop.starts_with("OK passes="), "{stop}");
    assert_eq!(console.command("MEM SUM 24 8", T).unwrap(), sum_before);
    assert!(console
        .command("CPUS", T)
        .unwrap()
        .starts_with("OK online=2"));
    // The disk: what was written before verifies, and new I/O works.
    console.command("DISK 0 VERIFY 0 256 7", T).unwrap();
    console.command("DISK 0 VERIFY 1000 64 11", T).unwrap();
    for i in 0..20u64 {
        console
            .command(&format!("DISK 0 WRITE {} 16 {}", 2000 + i * 16, 100 + i), T)
            .unwrap();
    }
    for i in 0..20u64 {
        console
            .command(
                &format!("DISK 0 VERIFY {} 16 {}", 2000 + i * 16, 100 + i),
                T,
            )
            .unwrap();
    }
    console.command("DISK 0 FLUSH", T).unwrap();
    // Exactly the requests sent since the restore were executed: the device took up the ring
    // where the saved one stood, replaying nothing the old VM had already served.
    let io = disk_counters.snapshot();
    assert_eq!((io.reads, io.writes, io.flushes), (22, 20, 1), "{io:?}");
    // The NIC: the frame left in the probe's buffers before the save is still next, then new
    // frames arrive, and the guest can send.
    let got = console.command("NET 0 RECV 5000", T).unwrap();
    assert!(
        got.ends_with(&vireo_probe_image::console::encode_hex(&frame(3))),
        "{got}"
    );
    host_port.send(&frame(4)).unwrap();
    let got = console.command("NET 0 RECV 5000", T).unwrap();
    assert!(
        got.ends_with(&vireo_probe_image::console::encode_hex(&frame(4))),
        "{got}"
    );
    console
        .command("NET 0 SEND ffffffffffff52540012345688b5aabbccee", T)
        .unwrap();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + T;
    let sent = loop {
        if let Some(n) = host_port.recv(&mut buf).unwrap() {
            if buf[12..14] == [0x88, 0xb5] && buf[n - 1] == 0xee {
                break n;
            }
        }
        assert!(Instant::now() < deadline, "the guest's frame never came");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(sent, 18);

    // Time went on while the VM was down (docs/vm-state.md, "Time"): kvmclock and the TSC
    // have advanced by at least the wall-clock time since the save, not just the run time.
    h.pause().unwrap();
    let now = h.save_state(Identity::default(), None).unwrap();
    let wall = (now.clock.host_realtime_ns - from.state.clock.host_realtime_ns) as f64;
    let kvmclock = (now.clock.clock.0.clock - from.state.clock.clock.0.clock) as f64;
    assert!(
        kvmclock > 0.95 * wall && kvmclock < 1.05 * wall + 50e6,
        "kvmclock advanced {kvmclock} ns over {wall} ns"
    );
    let tsc = |s: &vireo_vmm::VmState| {
        s.vcpus[0]
            .msrs
            .iter()
            .find(|m| m.0 == vireo_vmm::state::vcpu::MSR_IA32_TSC)
            .unwrap()
            .1
    };
    let khz = from.state.vcpus[0].tsc_khz.unwrap() as f64;
    let ticks = tsc(&now).wrapping_sub(tsc(&from.state)) as f64;
    assert!(
        ticks > 0.95 * wall * khz / 1e6,
        "TSC advanced {ticks} over {wall} ns"
    );
    // Pause/resume still works on the restored VM, and it powers off normally.
    h.resume().unwrap();
    console.send_line("POWEROFF 5").unwrap();
    assert_eq!(run.join().unwrap().unwrap(), VmExit::PowerOff(5));

    // The disk really holds what the restored guest wrote.
    let bytes = std::fs::read(&disk).unwrap();
    let mut want = vec![0u8; 16 * 512];
    vireo_probe_image::pattern::fill(&mut want, 100, 2000 * 512);
    assert_eq!(&bytes[2000 * 512..2016 * 512], &want[..]);
}

/// Saving needs a paused VM; a running one is refused with a typed error and keeps running.
#[test]
fn kvm_saving_a_running_vm_is_refused() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(MIB).unwrap();
    let Machine {
        vm, mut console, ..
    } = boot(&disk);
    let h = vm.handle();
    let run = std::thread::spawn(move || vm.run());
    console.wait_ready(T).unwrap();
    let e = h
        .save(&dir.path().join("save"), Identity::default(), None)
        .unwrap_err();
    assert!(matches!(e, vireo_vmm::StateError::NotPaused), "{e}");
    assert!(!dir.path().join("save").join(vireo_vmm::STATE_FILE).exists());
    assert_eq!(console.command("PING", T).unwrap(), "OK PONG");
    console.send_line("POWEROFF").unwrap();
    assert_eq!(run.join().unwrap().unwrap(), VmExit::PowerOff(0));
}
