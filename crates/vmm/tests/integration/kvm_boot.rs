//! Boots hand-assembled PVH guests under KVM: start state, serial in/out, power-off status,
//! several vCPUs, i8042 reset, triple fault and host-requested stop.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use vireo_vmm::{test_images, ConsoleConfig, Vm, VmConfig, VmExit};

fn usable() -> bool {
    vireo_testkit::require(vireo_testkit::Need::Kvm)
}

fn kernel(code: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest.elf");
    std::fs::write(&path, test_images::pvh_elf(code)).unwrap();
    (dir, path)
}

/// Runs `code` on `vcpus` vCPUs with the console on a socket pair; returns the exit and output.
fn run(code: &[u8], vcpus: usize, input: &[u8]) -> (VmExit, String) {
    let (_dir, path) = kernel(code);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(&path, 64 << 20, vcpus);
    config.console = ConsoleConfig::Stream(theirs);
    let vm = Vm::new(config).unwrap();
    (&ours).write_all(input).unwrap();
    let exit = vm.run().unwrap();
    ours.shutdown(std::net::Shutdown::Write).unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let mut reader = BufReader::new(&ours);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        out.push_str(&line);
        line.clear();
    }
    (exit, out)
}

#[test]
fn kvm_pvh_guest_prints_and_powers_off_with_its_status() {
    if !usable() {
        return;
    }
    let (exit, out) = run(&test_images::hello_poweroff(42), 1, b"");
    assert_eq!(exit, VmExit::PowerOff(42), "output: {out:?}");
    assert_eq!(out, "OK\n");
}

#[test]
fn kvm_serial_input_reaches_the_guest() {
    if !usable() {
        return;
    }
    let (exit, out) = run(&test_images::serial_echo(), 1, b"hello\nworld\nq");
    assert_eq!(exit, VmExit::PowerOff(7));
    assert_eq!(out, "hello\nworld\n");
}

#[test]
fn kvm_application_processors_start_at_the_pvh_entry() {
    if !usable() {
        return;
    }
    let (exit, _) = run(&test_images::smp_count(2), 3, b"");
    assert_eq!(exit, VmExit::PowerOff(2));
}

#[test]
fn kvm_i8042_reset_stops_the_vm() {
    if !usable() {
        return;
    }
    let (exit, _) = run(&test_images::i8042_reset(), 1, b"");
    assert_eq!(exit, VmExit::Reset);
}

#[test]
fn kvm_triple_fault_is_a_clear_error() {
    if !usable() {
        return;
    }
    let (exit, _) = run(&test_images::triple_fault(), 1, b"");
    match exit {
        VmExit::Error(msg) => {
            assert!(msg.contains("vCPU 0"), "{msg}");
            assert!(msg.contains("RIP"), "{msg}");
        }
        other => panic!("expected an error exit, got {other:?}"),
    }
}

#[test]
fn kvm_instruction_kvm_cannot_run_is_a_clear_error() {
    if !usable() {
        return;
    }
    // int3 with no IDT: KVM-PVM cannot emulate it (internal error); hardware KVM triple-faults.
    let (exit, _) = run(&[0xcc], 1, b"");
    match exit {
        VmExit::Error(msg) => {
            println!("{msg}");
            assert!(msg.starts_with("vCPU 0: "), "{msg}");
            assert!(msg.contains("RIP 0x100000"), "{msg}");
        }
        other => panic!("expected an error exit, got {other:?}"),
    }
}

#[test]
fn kvm_host_stop_ends_a_spinning_guest() {
    if !usable() {
        return;
    }
    // jmp $ at CPL0: never exits on its own.
    let (_dir, path) = kernel(&[0xeb, 0xfe]);
    let vm = Vm::new(VmConfig::new(&path, 32 << 20, 2)).unwrap();
    let handle = vm.handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        handle.request_stop();
    });
    assert_eq!(vm.run().unwrap(), VmExit::Stopped);
    stopper.join().unwrap();
}
