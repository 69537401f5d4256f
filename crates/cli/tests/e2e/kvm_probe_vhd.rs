//! `vireo run --disk` on VHD images: the guest sees the VHD's virtual disk, not the file's bytes,
//! and after power-off the file is still a VHD holding the guest's data (read back by our reader
//! and by qemu-img). Also `format=raw` forcing raw over a signature.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::*;
use vireo_block::BlockBackend;
use vireo_probe_image::pattern;
use vireo_testkit::{require, Need};
use vireo_vhdx::vhd::{DiskType, Vhd, VhdCreateOptions};

const SIZE: u64 = 64 << 20;
const SECTORS: u64 = SIZE / 512;
/// Guest writes: (first sector, sectors, seed). LBA 0 is where a dynamic VHD keeps its footer
/// copy and headers; the last sectors are where a fixed VHD keeps its footer.
const WRITES: [(u64, u64, u64); 3] = [(0, 2048, 7), (70_000, 64, 8), (SECTORS - 8, 8, 9)];

fn create_vhd(path: &Path, disk_type: DiskType) {
    let opts = VhdCreateOptions {
        size: SIZE,
        disk_type,
        block_size: None,
    };
    drop(Vhd::create(path, &opts).unwrap());
}

/// Boots the probe on `path`, checks what the guest sees, writes `WRITES`, powers off, and
/// checks the file is still a VHD that holds them.
fn guest_writes_land_inside_the_vhd(path: &Path) {
    let arg = path.to_str().unwrap();
    let mut vm = ProbeVm::start(&[], &["--memory", "64M", "--disk", arg]);
    assert_eq!(
        vm.ok("DISK 0 INFO"),
        format!("OK sectors={SECTORS} ro=0 blk_size=512")
    );
    for (lba, count, seed) in WRITES {
        vm.ok(&format!("DISK 0 WRITE {lba} {count} {seed}"));
    }
    vm.ok("DISK 0 FLUSH");
    for (lba, count, seed) in WRITES {
        vm.ok(&format!("DISK 0 VERIFY {lba} {count} {seed}"));
    }
    assert_eq!(vm.poweroff(0), Some(0));

    // Our reader: still a VHD of the same size, with the guest's data where the guest put it.
    let disk = Vhd::open(path, true).unwrap();
    assert_eq!(disk.size(), SIZE);
    let mut expected = vec![0u8; SIZE as usize];
    for (lba, count, seed) in WRITES {
        let at = lba * 512;
        let mut got = vec![0u8; (count * 512) as usize];
        disk.read_at(&mut got, at).unwrap();
        assert_eq!(pattern::verify(&got, seed, at), None, "sector {lba}");
        pattern::fill(&mut expected[at as usize..][..got.len()], seed, at);
    }
    drop(disk);

    // An independent reader: qemu-img opens it as a VHD and sees exactly those bytes.
    if !require(Need::QemuImg) {
        return;
    }
    let raw = path.with_extension("expected.raw");
    std::fs::write(&raw, &expected).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "vpc", "-F", "raw"])
        .arg(path)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kvm_probe_uses_a_dynamic_vhd_as_a_vhd() {
    if !require(Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dyn.vhd");
    create_vhd(&path, DiskType::Dynamic);
    guest_writes_land_inside_the_vhd(&path);
}

#[test]
fn kvm_probe_uses_a_fixed_vhd_as_a_vhd() {
    if !require(Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fixed.vhd");
    create_vhd(&path, DiskType::Fixed);
    guest_writes_land_inside_the_vhd(&path);
    // The footer is where it was: the guest's last sectors did not overwrite it.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE + 512);
}

#[test]
fn kvm_probe_format_raw_attaches_a_signed_file_as_raw() {
    if !require(Need::Kvm) {
        return;
    }
    // A raw disk whose guest data happens to start like a qcow2 header: refused by detection,
    // served as raw when the user says so.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("looks-like-qcow2.img");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..4].copy_from_slice(b"QFI\xfb");
    std::fs::write(&path, &bytes).unwrap();
    let arg = format!("{},format=raw", path.display());
    let mut vm = ProbeVm::start(&[], &["--memory", "64M", "--disk", &arg]);
    assert_eq!(vm.ok("DISK 0 INFO"), "OK sectors=2048 ro=0 blk_size=512");
    vm.ok("DISK 0 WRITE 8 8 5");
    vm.ok("DISK 0 FLUSH");
    assert_eq!(vm.poweroff(0), Some(0));
    let after = std::fs::read(&path).unwrap();
    assert_eq!(&after[..4], b"QFI\xfb");
    assert_eq!(pattern::verify(&after[8 * 512..16 * 512], 5, 8 * 512), None);
}
