//! VHD (v1) files from raw bytes: footer, dynamic header, BAT, parent locators, reads.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use vireo_block::BlockBackend;
use vireo_vhdx::vhd::Vhd;

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("vhd-fuzz-{}.vhd", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(&path, data).unwrap();
    if let Ok(disk) = Vhd::open(&path, true) {
        let _ = disk.info();
        let ranges = disk.allocated_ranges();
        let size = disk.size();
        let mut buf = vec![0u8; 64 << 10];
        for (start, _) in ranges.iter().take(8) {
            let n = (size - start).min(buf.len() as u64) as usize;
            let _ = disk.read_at(&mut buf[..n], *start);
        }
    }
    assert!(std::fs::read(&path).unwrap() == data, "a read-only open modified the file");
});
