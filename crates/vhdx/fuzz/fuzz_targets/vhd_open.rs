//! VHD (v1) files from raw bytes: footer, dynamic header, BAT, parent locators, reads.
//! Inputs whose first byte is odd get their footer and dynamic-header checksums fixed up first,
//! so mutations reach the BAT, block and locator logic instead of dying at the checksum.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use vireo_block::BlockBackend;
use vireo_vhdx::vhd::format::checksum;
use vireo_vhdx::vhd::Vhd;

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("vhd-fuzz-{}.vhd", std::process::id()))
}

fn fix_checksums(image: &mut [u8]) {
    let len = image.len();
    let mut spots = vec![(0, 512, 64), (512, 1024, 36)];
    if len >= 512 {
        spots.push((len - 512, 512, 64));
    }
    for (at, size, field) in spots {
        if at + size <= len {
            let sum = checksum(&image[at..at + size], field);
            image[at + field..at + field + 4].copy_from_slice(&sum.to_be_bytes());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut image = data.to_vec();
    if data.first().is_some_and(|b| b & 1 == 1) {
        fix_checksums(&mut image);
    }
    let path = scratch();
    std::fs::write(&path, &image).unwrap();
    if let Ok(disk) = Vhd::open(&path, true) {
        let _ = disk.info();
        let ranges = disk.allocated_ranges();
        let size = disk.size();
        let mut buf = vec![0u8; 64 << 10];
        for (start, len) in ranges.iter().take(8) {
            let n = len.min(&(buf.len() as u64)).min(&(size - start)).to_owned() as usize;
            let _ = disk.read_at(&mut buf[..n], *start);
        }
    }
    assert!(
        std::fs::read(&path).unwrap() == image,
        "a read-only open modified the file"
    );
});
