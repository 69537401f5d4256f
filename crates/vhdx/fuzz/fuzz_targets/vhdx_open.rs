//! Whole-file fuzzing of open + log replay + info + reads + check on a valid 8 MiB VHDX (with a
//! differencing-capable layout and a non-empty log) that the input patches: the input is a list
//! of `(offset: u32 LE, len: u8, bytes)` records, so every structure is reachable while the
//! corpus stays tiny. Opening is read-only with in-memory replay: the file must never change.
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vireo_block::BlockBackend;
use vireo_vhdx::{CreateOptions, OpenOptions, Vhdx};

fn base() -> &'static Vec<u8> {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vhdx-fuzz-base-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("base.vhdx");
        let _ = std::fs::remove_file(&path);
        let disk = Vhdx::create(
            &path,
            &CreateOptions {
                size: 8 << 20,
                block_size: 1 << 20,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        disk.write_at(&[0x5a; 8192], 4096).unwrap();
        disk.write_at(&[0xa5; 4096], 5 << 20).unwrap();
        disk.flush().unwrap();
        drop(disk);
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        bytes
    })
}

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("vhdx-fuzz-{}.vhdx", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let mut image = base().clone();
    let mut rest = data;
    // Optional truncation record first: 0xff, then a u32 length.
    if rest.len() >= 5 && rest[0] == 0xff {
        let len = u32::from_le_bytes(rest[1..5].try_into().unwrap()) as usize;
        image.truncate(len.min(image.len()));
        rest = &rest[5..];
    }
    while rest.len() >= 5 {
        let off = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let len = rest[4] as usize;
        let bytes = &rest[5..(5 + len).min(rest.len())];
        rest = &rest[(5 + len).min(rest.len())..];
        if let Some(end) = off.checked_add(bytes.len()) {
            if end <= image.len() {
                image[off..end].copy_from_slice(bytes);
            }
        }
    }
    let path = scratch();
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&image).unwrap();
    drop(f);
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
