#![allow(dead_code)]
use std::path::{Path, PathBuf};

use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vireo-vhdx-test")
        .tempdir()
        .unwrap()
}

pub fn opts(size: u64, block_size: u32, disk_type: DiskType) -> CreateOptions {
    CreateOptions {
        size,
        disk_type,
        block_size,
        ..Default::default()
    }
}

pub fn create(dir: &Path, name: &str, o: &CreateOptions) -> (PathBuf, Vhdx) {
    let p = dir.join(name);
    let d = Vhdx::create(&p, o).unwrap();
    (p, d)
}

pub fn reopen(p: &Path) -> Vhdx {
    Vhdx::open(p, &OpenOptions::default()).unwrap()
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

pub fn read(d: &Vhdx, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read(&mut b, off).unwrap();
    b
}

/// Runs `qemu-img` if installed; `None` (after printing why) when it is absent.
pub fn qemu_img(args: &[&str]) -> Option<(bool, String)> {
    match std::process::Command::new("qemu-img").args(args).output() {
        Ok(o) => Some((
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )),
        Err(_) => {
            eprintln!("SKIPPED: qemu-img not installed");
            None
        }
    }
}
