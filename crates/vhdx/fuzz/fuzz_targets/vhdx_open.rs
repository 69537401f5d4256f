//! Whole-file fuzzing of open + log replay + info + reads + check on a valid 8 MiB VHDX (with a
//! differencing-capable layout and a non-empty log) that the input patches: the input is a list
//! of `(offset: u32 LE, len: u8, bytes)` records, so every structure is reachable while the
//! corpus stays tiny. Opening is read-only with in-memory replay: the file must never change.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use vireo_block::BlockBackend;
use vireo_vhdx::{OpenOptions, Vhdx};

fuzz_target!(|data: &[u8]| {
    let image = common::patched(data);
    let path = common::scratch(&image);
    if let Ok(disk) = Vhdx::open(&path, &OpenOptions::read_only()) {
        let _ = disk.info();
        let _ = disk.allocated_ranges();
        let size = disk.size();
        let mut buf = vec![0u8; 64 << 10];
        for off in [0, 4096, 5 << 20, size.saturating_sub(buf.len() as u64)] {
            if off + buf.len() as u64 <= size {
                let _ = disk.read_at(&mut buf, off);
            }
        }
    }
    let _ = Vhdx::check(&path, false);
    assert!(
        std::fs::read(&path).unwrap() == image,
        "a read-only open or check modified the file"
    );
});
