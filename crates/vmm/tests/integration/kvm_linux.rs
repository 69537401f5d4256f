//! Boots a real Linux bzImage to its first console lines. Runs only where /dev/kvm is
//! hardware-backed (VMX/SVM): on KVM-PVM machines Linux cannot boot (it needs cmpxchg16b, xsave
//! and int3 at CPL0), so the test says why it skipped. The kernel is $VIREO_TEST_KERNEL or the
//! newest /boot/vmlinuz-*.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vireo_vmm::{ConsoleConfig, Vm, VmConfig};

fn hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

fn find_kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("VIREO_TEST_KERNEL") {
        return Some(k.into());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found.pop()
}

#[test]
fn kvm_real_linux_prints_its_banner() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    // Facts of the host no setup changes (a KVM-PVM host has no VMX/SVM; a container has no
    // /boot): recorded, but not failures under CI.
    if !hardware_virtualization() {
        vireo_testkit::skip_env("a hardware-backed /dev/kvm (vmx/svm in /proc/cpuinfo); stock Linux cannot boot under KVM-PVM");
        return;
    }
    let Some(kernel) = find_kernel() else {
        vireo_testkit::skip_env(
            "a Linux kernel (set VIREO_TEST_KERNEL or install /boot/vmlinuz-*)",
        );
        return;
    };
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(&kernel, 512 << 20, 1);
    config.cmdline = "console=ttyS0 reboot=k panic=-1 earlyprintk=serial".into();
    config.console = ConsoleConfig::Stream(theirs);
    let vm = Vm::new(config).unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(ours).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let mut banner = false;
    while Instant::now() < deadline && !handle.exited() {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            banner |= line.contains("Linux version");
            let cmdline_seen = line.contains("Kernel command line") && banner;
            seen.push(line);
            if cmdline_seen {
                break;
            }
        }
    }
    handle.request_stop();
    let exit = runner.join().unwrap().unwrap();
    assert!(
        banner,
        "no Linux banner; exit {exit:?}; output:\n{}",
        seen.join("\n")
    );
}
