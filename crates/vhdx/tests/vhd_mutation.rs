//! Random and mutated VHD files never panic, hang or get modified by a read-only open (the CI
//! counterpart of the `vhd_open` cargo-fuzz target, which needs a nightly-capable toolchain).

use proptest::prelude::*;
use vireo_block::BlockBackend;
use vireo_vhdx::vhd::format::checksum;
use vireo_vhdx::vhd::{DiskType, Vhd, VhdCreateOptions};

fn seed_image() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.vhd");
    let disk = Vhd::create(
        &path,
        &VhdCreateOptions {
            size: 64 << 10,
            disk_type: DiskType::Dynamic,
            block_size: Some(4096),
        },
    )
    .unwrap();
    disk.write_at(&[0x5a; 4096], 8192).unwrap();
    disk.write_at(&[0xa5; 512], 60 << 10).unwrap();
    drop(disk);
    std::fs::read(&path).unwrap()
}

fn exercise(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.vhd");
    std::fs::write(&path, bytes).unwrap();
    if let Ok(disk) = Vhd::open(&path, true) {
        let size = disk.size();
        let mut buf = vec![0u8; 8192];
        for (start, len) in disk.allocated_ranges().into_iter().take(4) {
            let n = len.min(buf.len() as u64).min(size - start) as usize;
            let _ = disk.read_at(&mut buf[..n], start);
        }
        let _ = disk.info();
    }
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "read-only open changed the file"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn mutated_vhd_never_panics(flips in proptest::collection::vec((0usize..16384, any::<u8>()), 1..12),
                                truncate in proptest::option::of(0usize..16384),
                                fix_checksums: bool) {
        let mut image = seed_image();
        for (at, value) in flips {
            let at = at % image.len();
            image[at] = value;
        }
        if fix_checksums {
            // Reach past the checksums into the BAT, block and locator logic.
            let len = image.len();
            for (at, size, field) in [(0, 512, 64), (len - 512, 512, 64), (512, 1024, 36)] {
                let sum = checksum(&image[at..at + size], field);
                image[at + field..at + field + 4].copy_from_slice(&sum.to_be_bytes());
            }
        }
        if let Some(len) = truncate {
            image.truncate(len.min(image.len()));
        }
        exercise(&image);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        exercise(&bytes);
    }
}
