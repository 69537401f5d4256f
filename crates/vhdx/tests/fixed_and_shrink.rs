//! Sizes on disk and shrinks: fixed VHD and VHDX disks take their whole size up front (also when
//! grown), and a VHD shrink is refused only when data lies past the new end.
mod common;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use vireo_block::BlockBackend;
use vireo_testkit::Need;
use vireo_vhdx::vhd::{DiskType as VhdType, Vhd, VhdCreateOptions, VhdError};
use vireo_vhdx::DiskType;

const MIB: u64 = 1 << 20;

fn on_disk(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

fn vhd(dir: &Path, name: &str, size: u64, disk_type: VhdType) -> (std::path::PathBuf, Vhd) {
    let p = dir.join(name);
    let d = Vhd::create(
        &p,
        &VhdCreateOptions {
            size,
            disk_type,
            block_size: None,
        },
    )
    .unwrap();
    (p, d)
}

fn vhd_read(d: &Vhd, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read_at(&mut b, off).unwrap();
    b
}

/// qemu-img must read `p` (a VHD) as exactly `want`.
fn qemu_sees(p: &Path, want: &[u8]) {
    if !vireo_testkit::require(Need::QemuImg) {
        return;
    }
    let raw = p.with_extension("want.raw");
    std::fs::write(&raw, want).unwrap();
    let (ok, out) = qemu_img(&[
        "compare",
        "-f",
        "vpc",
        "-F",
        "raw",
        p.to_str().unwrap(),
        raw.to_str().unwrap(),
    ])
    .unwrap();
    assert!(ok && !out.contains("mismatch"), "qemu-img compare: {out}");
}

#[test]
fn fixed_vhd_takes_its_whole_size_on_disk() {
    let dir = tmpdir();
    let (p, d) = vhd(dir.path(), "f.vhd", 64 * MIB, VhdType::Fixed);
    assert!(
        on_disk(&p) >= 64 * MIB,
        "64 MiB fixed VHD: {} bytes",
        on_disk(&p)
    );
    d.write_at(&[3; 4096], 64 * MIB - 4096).unwrap();
    d.resize_to(96 * MIB, false).unwrap();
    assert!(
        on_disk(&p) >= 96 * MIB,
        "grown to 96 MiB: {} bytes",
        on_disk(&p)
    );
    let mut want = vec![0u8; 96 * MIB as usize];
    want[(64 * MIB - 4096) as usize..64 * MIB as usize].fill(3);
    assert!(vhd_read(&d, 0, want.len()) == want);
    // Shrinking over the data is refused; over nothing it is not.
    assert!(matches!(
        d.resize_to(32 * MIB, false),
        Err(VhdError::ShrinkOverData { data_at, .. }) if data_at == 64 * MIB - 4096
    ));
    d.resize_to(64 * MIB, false).unwrap();
    drop(d);
    let d = Vhd::open(&p, false).unwrap();
    assert_eq!(d.size(), 64 * MIB);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 64 * MIB + 512);
    want.truncate(64 * MIB as usize);
    drop(d);
    qemu_sees(&p, &want);
}

#[test]
fn fixed_vhdx_takes_its_whole_size_on_disk_also_when_grown() {
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "f.vhdx",
        &opts(64 * MIB, MIB as u32, DiskType::Fixed),
    );
    assert!(
        on_disk(&p) >= 64 * MIB,
        "64 MiB fixed VHDX: {}",
        on_disk(&p)
    );
    d.resize(96 * MIB, false).unwrap();
    drop(d);
    assert!(on_disk(&p) >= 96 * MIB, "grown to 96 MiB: {}", on_disk(&p));
    assert_eq!(
        read(&reopen(&p), 64 * MIB, MIB as usize),
        vec![0; MIB as usize]
    );
}

#[test]
fn vhd_shrink_refuses_only_data_past_the_new_end() {
    let dir = tmpdir();
    // Empty: shrinks without force, also through the block-device interface a VM uses.
    let (p, d) = vhd(dir.path(), "e.vhd", 64 * MIB, VhdType::Dynamic);
    d.resize_to(32 * MIB, false).unwrap();
    BlockBackend::resize(&d, 16 * MIB).unwrap();
    drop(d);
    assert_eq!(Vhd::open(&p, true).unwrap().size(), 16 * MIB);

    // 2 MiB blocks: data at 39 MiB allocates the block at 38 MiB; data at 17 MiB + 512 sits
    // in the block a 17 MiB end cuts.
    let (p, d) = vhd(dir.path(), "d.vhd", 64 * MIB, VhdType::Dynamic);
    d.write_at(&[1; 4096], 39 * MIB).unwrap();
    d.write_at(&[2; 512], 17 * MIB + 512).unwrap();
    assert!(matches!(
        d.resize_to(20 * MIB, false),
        Err(VhdError::ShrinkOverData { data_at, .. }) if data_at == 38 * MIB
    ));
    assert!(matches!(
        BlockBackend::resize(&d, 20 * MIB),
        Err(vireo_block::BlockError::Refused(_))
    ));
    d.resize_to(40 * MIB, false).unwrap();
    assert!(matches!(
        d.resize_to(17 * MIB, false),
        Err(VhdError::ShrinkOverData { data_at, .. }) if data_at == 17 * MIB + 512
    ));
    // Forced: the data is gone, and growing again shows zeroes, not the old bytes.
    d.resize_to(17 * MIB, true).unwrap();
    d.resize_to(64 * MIB, false).unwrap();
    let want = vec![0u8; 64 * MIB as usize];
    assert!(vhd_read(&d, 17 * MIB, 47 * MIB as usize) == want[17 * MIB as usize..]);
    drop(d);
    let d = Vhd::open(&p, false).unwrap();
    assert_eq!(d.size(), 64 * MIB);
    assert!(vhd_read(&d, 0, want.len()) == want);
    drop(d);
    qemu_sees(&p, &want);
}
