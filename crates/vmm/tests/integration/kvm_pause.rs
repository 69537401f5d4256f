//! Pause, resume and reset at the VMM level, with a hand-assembled guest that prints `B` once
//! at boot and then stores its TSC and a loop counter at 2 MiB forever; the test reads both
//! straight from guest memory through the VmHandle.

use crate::common;

use common::read;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vireo_vmm::{test_images, ConsoleConfig, Vm, VmConfig, VmExit, VmHandle};
use vm_memory::{Bytes, GuestAddress};

const TSC_AT: u64 = 0x20_0000;
const COUNTER_AT: u64 = 0x20_0008;
const MARKER_AT: u64 = 0x30_0000;
const T: Duration = Duration::from_secs(30);

#[rustfmt::skip]
fn tsc_loop() -> Vec<u8> {
    vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'B', 0xee, // mov al, 'B'; out dx, al
        0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
        // loop:
        0x0f, 0x31, // rdtsc
        0xa3, 0x00, 0x00, 0x20, 0x00, // mov [0x200000], eax
        0x89, 0x15, 0x04, 0x00, 0x20, 0x00, // mov [0x200004], edx
        0xff, 0x05, 0x08, 0x00, 0x20, 0x00, // inc dword [0x200008]
        0xeb, 0xeb, // jmp loop
    ]
}

fn counter(h: &VmHandle) -> u64 {
    read(h, COUNTER_AT) & 0xffff_ffff
}

fn wait_advance(h: &VmHandle, from: u64) -> u64 {
    let deadline = Instant::now() + T;
    loop {
        let c = counter(h);
        if c != from {
            return c;
        }
        assert!(Instant::now() < deadline, "the guest does not run");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Lines the guest printed, read on a thread of its own.
fn lines(console: UnixStream) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(console).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn kvm_pause_resume_reset_and_stop_while_paused() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tsc.elf");
    std::fs::write(&path, test_images::pvh_elf(&tsc_loop())).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(&path, 32 << 20, 1);
    config.console = ConsoleConfig::Stream(theirs);
    let vm = Vm::new(config).unwrap();
    let h = vm.handle();
    // Paused before it ever ran: the vCPU parks before its first KVM_RUN.
    h.pause().unwrap();
    assert!(h.is_paused());
    let run = std::thread::spawn(move || vm.run());
    let out = lines(ours.try_clone().unwrap());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(counter(&h), 0, "ran while paused from the start");
    h.resume().unwrap();
    assert_eq!(out.recv_timeout(T).unwrap(), "B");
    let c = wait_advance(&h, 0);
    wait_advance(&h, c);

    // The guest's TSC rate, measured by the guest's own stores.
    let (t0, i0) = (read(&h, TSC_AT), Instant::now());
    std::thread::sleep(Duration::from_millis(100));
    let rate = (read(&h, TSC_AT) - t0) as f64 / i0.elapsed().as_secs_f64();
    assert!(rate > 1e6, "TSC rate {rate}");

    for _ in 0..10 {
        h.pause().unwrap();
        h.pause().unwrap();
        assert!(h.is_paused());
        let (c, tsc) = (counter(&h), read(&h, TSC_AT));
        let paused_at = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(counter(&h), c, "the vCPU ran while paused");
        let paused_for = paused_at.elapsed().as_secs_f64();
        h.resume().unwrap();
        h.resume().unwrap();
        assert!(!h.is_paused());
        let c2 = wait_advance(&h, c);
        wait_advance(&h, c2);
        // docs/vmm.md: the guest's TSC is not adjusted, the paused time shows in it.
        let jumped = (read(&h, TSC_AT) - tsc) as f64;
        assert!(
            jumped > 0.8 * rate * paused_for,
            "TSC advanced {jumped} over {paused_for} s paused at {rate}/s"
        );
    }

    // Reset: memory is wiped (the marker goes), the kernel is loaded again and the vCPU
    // starts at its entry (a second `B`), and runs.
    h.memory()
        .write_obj(0xfeed_f00d_u64, GuestAddress(MARKER_AT))
        .unwrap();
    h.reset().unwrap();
    assert_eq!(out.recv_timeout(T).unwrap(), "B");
    assert_eq!(read(&h, MARKER_AT), 0);
    let c = wait_advance(&h, counter(&h));
    wait_advance(&h, c);
    assert!(!h.is_paused());

    // Stop while paused: the VM ends as stopped.
    h.pause().unwrap();
    h.request_stop();
    let exit = run.join().unwrap().unwrap();
    assert_eq!(exit, VmExit::Stopped);
    assert!(matches!(
        h.pause(),
        Err(vireo_vmm::LifecycleError::NotRunning)
    ));
    assert!(matches!(
        h.resume(),
        Err(vireo_vmm::LifecycleError::NotRunning)
    ));
    assert!(matches!(
        h.reset(),
        Err(vireo_vmm::LifecycleError::NotRunning)
    ));
}

/// A reset whose kernel file is gone fails before it touches the VM, which runs on.
#[test]
fn kvm_reset_without_its_kernel_file_leaves_the_vm_running() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tsc.elf");
    std::fs::write(&path, test_images::pvh_elf(&tsc_loop())).unwrap();
    let (_ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(&path, 32 << 20, 1);
    config.console = ConsoleConfig::Stream(theirs);
    let vm = Vm::new(config).unwrap();
    let h = vm.handle();
    let run = std::thread::spawn(move || vm.run());
    let c = wait_advance(&h, 0);
    std::fs::remove_file(&path).unwrap();
    let e = h.reset().unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(!h.is_paused());
    wait_advance(&h, c);
    h.request_stop();
    assert_eq!(run.join().unwrap().unwrap(), VmExit::Stopped);
}
