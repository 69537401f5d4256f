//! `vireo run` booting the probe guest: READY, several vCPUs, disks (guest→host and host→guest
//! patterns, read-only refusal), and two VMs exchanging frames over TAPs on a bridge.

use crate::common;

use std::io::{Read, Seek, SeekFrom, Write};

use common::*;
use vireo_probe_image::{pattern, probe_elf, ProbeConsole, ProbeError};

#[test]
fn kvm_probe_boots_to_ready_on_two_vcpus() {
    if !kvm_usable() {
        return;
    }
    let mut vm = ProbeVm::start(&[], &["--memory", "256M", "--vcpus", "2"]);
    assert_eq!(vm.ok("PING"), "OK PONG");
    let info = vm.ok("INFO");
    assert!(info.contains("mem_mib=256"), "{info}");
    assert_eq!(vm.ok("CPUS"), "OK online=2");
    assert_eq!(vm.poweroff(3), Some(3));
}

#[test]
fn kvm_probe_memory_takes_a_fractional_size() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let mut vm = ProbeVm::start(&[], &["--memory", "1.5G"]);
    assert!(vm.ok("INFO").contains("mem_mib=1536"));
    assert_eq!(vm.poweroff(0), Some(0));
}

#[test]
fn kvm_probe_disks_round_trip_and_read_only_refuses_writes() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rw = dir.path().join("rw.img");
    let ro = dir.path().join("ro.img");
    std::fs::File::create(&rw)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    std::fs::File::create(&ro)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // The host writes a pattern the guest will verify: sectors 4096..4160, seed 22.
    let mut host_data = vec![0u8; 64 * 512];
    pattern::fill(&mut host_data, 22, 4096 * 512);
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&rw).unwrap();
        f.seek(SeekFrom::Start(4096 * 512)).unwrap();
        f.write_all(&host_data).unwrap();
    }
    let rw_arg = rw.to_str().unwrap().to_string();
    let ro_arg = format!("{},ro", ro.display());
    let mut vm = ProbeVm::start(
        &[],
        &["--memory", "128M", "--disk", &rw_arg, "--disk", &ro_arg],
    );
    assert_eq!(vm.ok("DISK 0 INFO"), "OK sectors=16384 ro=0 blk_size=512");
    assert_eq!(vm.ok("DISK 1 INFO"), "OK sectors=2048 ro=1 blk_size=512");
    vm.ok("DISK 0 WRITE 16 128 11");
    vm.ok("DISK 0 FLUSH");
    vm.ok("DISK 0 VERIFY 4096 64 22");
    match vm.console.command("DISK 1 WRITE 0 8 5", T) {
        Err(ProbeError::Err(msg)) => assert!(msg.starts_with("status="), "{msg}"),
        other => panic!("write to a read-only disk: {other:?}"),
    }
    // The guest's write is in the host file, byte for byte.
    let mut got = vec![0u8; 128 * 512];
    let mut f = std::fs::File::open(&rw).unwrap();
    f.seek(SeekFrom::Start(16 * 512)).unwrap();
    f.read_exact(&mut got).unwrap();
    assert_eq!(pattern::verify(&got, 11, 16 * 512), None);
    assert_eq!(vm.poweroff(0), Some(0));
    // The read-only image is untouched.
    assert!(std::fs::read(&ro).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn kvm_probe_uses_a_vhdx_disk() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let opts = vireo_vhdx::CreateOptions {
        size: 16 << 20,
        block_size: 1 << 20,
        ..Default::default()
    };
    drop(vireo_vhdx::Vhdx::create(&path, &opts).unwrap());
    let arg = path.to_str().unwrap().to_string();
    let mut vm = ProbeVm::start(&[], &["--memory", "64M", "--disk", &arg]);
    assert_eq!(vm.ok("DISK 0 INFO"), "OK sectors=32768 ro=0 blk_size=512");
    vm.ok("DISK 0 WRITE 2040 64 9");
    vm.ok("DISK 0 FLUSH");
    vm.ok("DISK 0 VERIFY 2040 64 9");
    assert_eq!(vm.poweroff(0), Some(0));
    // The data is in the VHDX as the format sees it, not at raw offsets of the container.
    let disk = vireo_vhdx::Vhdx::open(&path, &vireo_vhdx::OpenOptions::read_only()).unwrap();
    let mut got = vec![0u8; 64 * 512];
    vireo_block::BlockBackend::read_at(&disk, &mut got, 2040 * 512).unwrap();
    assert_eq!(pattern::verify(&got, 9, 2040 * 512), None);
}

/// With mapped disk I/O on (the default), the guest's reads and writes of a raw image and of
/// a VHDX's present payload blocks are copies through a shared mapping of the file: the
/// mapping is there while the VM runs, and what the guest wrote and flushed is in the file
/// for a reader that does not share the page cache's view of it (pages dropped first).
#[test]
fn kvm_probe_disk_io_goes_through_a_mapping_of_the_image() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("mapped.img");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let vhdx = dir.path().join("mapped.vhdx");
    let opts = vireo_vhdx::CreateOptions {
        size: 16 << 20,
        block_size: 1 << 20,
        ..Default::default()
    };
    drop(vireo_vhdx::Vhdx::create(&vhdx, &opts).unwrap());
    let (raw_arg, vhdx_arg) = (raw.to_str().unwrap(), vhdx.to_str().unwrap());
    let mut vm = ProbeVm::start(
        &[],
        &["--memory", "64M", "--disk", raw_arg, "--disk", vhdx_arg],
    );
    for d in 0..2 {
        // The first write allocates the VHDX's block (staged path); the ones after it land
        // in a present block, which the mapped path serves.
        vm.ok(&format!("DISK {d} WRITE 0 2048 5"));
        vm.ok(&format!("DISK {d} WRITE 100 300 6"));
        vm.ok(&format!("DISK {d} WRITE 1500 8 7"));
        vm.ok(&format!("DISK {d} FLUSH"));
        vm.ok(&format!("DISK {d} VERIFY 0 100 5"));
        vm.ok(&format!("DISK {d} VERIFY 100 300 6"));
        vm.ok(&format!("DISK {d} VERIFY 1500 8 7"));
    }
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vm.child.id())).unwrap();
    for p in [&raw, &vhdx] {
        assert!(
            maps.contains(p.to_str().unwrap()),
            "{} is not mapped by the VMM:\n{maps}",
            p.display()
        );
    }
    // The raw image through another descriptor, its cached pages dropped after the flush.
    let f = std::fs::File::open(&raw).unwrap();
    use std::os::unix::io::AsRawFd;
    // SAFETY: fadvise on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
    let mut got = vec![0u8; 300 * 512];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, 100 * 512).unwrap();
    assert_eq!(pattern::verify(&got, 6, 100 * 512), None);
    assert_eq!(vm.poweroff(0), Some(0));
    let disk = vireo_vhdx::Vhdx::open(&vhdx, &vireo_vhdx::OpenOptions::read_only()).unwrap();
    for (lba, n, seed) in [(0u64, 100usize, 5u64), (100, 300, 6), (1500, 8, 7)] {
        let mut got = vec![0u8; n * 512];
        vireo_block::BlockBackend::read_at(&disk, &mut got, lba * 512).unwrap();
        assert_eq!(
            pattern::verify(&got, seed, lba * 512),
            None,
            "VHDX sector {lba}"
        );
    }
}

#[test]
fn kvm_probe_debug_log_tells_the_boot_in_plain_text() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut child = vireo()
        .args([
            "run",
            "--kernel",
            probe_elf().to_str().unwrap(),
            "--memory",
            "64M",
        ])
        .args(["--disk", disk.to_str().unwrap()])
        .env("VIREO_LOG", "debug")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let mut console = ProbeConsole::new(child.stdout.take().unwrap(), child.stdin.take().unwrap());
    if let Err(e) = console.wait_ready(T) {
        let _ = child.kill();
        panic!("probe did not become ready: {e}");
    }
    assert_eq!(
        console.command("DISK 0 INFO", T).unwrap(),
        "OK sectors=2048 ro=0 blk_size=512"
    );
    let _ = console.command("POWEROFF 0", T);
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let log = log.join().unwrap();
    for want in [
        "guest memory: 64 MiB",
        "memory slot 0: guest 0x0..0x4000000",
        "virtio-mmio device 0: block at 0xd0000000, GSI 5",
        "PVH entry 0x",
        "vCPU 0 running",
        "block device activated by the driver",
        "VM stopping: PowerOff(0)",
        "vCPU 0 stopped; exits: ",
    ] {
        assert!(log.contains(want), "no {want:?} in the debug log:\n{log}");
    }
    assert!(!log.contains('\x1b'), "colour codes on a pipe: {log:?}");
}
