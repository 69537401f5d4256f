//! The request driver the I/O probes share.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use vireo_vhdx::{CreateOptions, DiskType, Vhdx};

/// Runs `count` requests of `len` bytes at `offs(i)` on `threads` threads; returns MiB/s.
pub fn run(
    threads: usize,
    count: u64,
    len: usize,
    offs: &(dyn Fn(u64) -> u64 + Sync),
    io: &(dyn Fn(&mut [u8], u64) + Sync),
) -> f64 {
    let next = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0xa5u8; len];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    io(&mut buf, offs(i));
                }
            });
        }
    });
    (count * len as u64) as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

/// A fresh dynamic VHDX and a sparse raw file of `size` bytes in `dir`, named after `name` and
/// this process: (VHDX path, VHDX, raw path, raw file).
pub fn fresh_pair(dir: &Path, name: &str, size: u64) -> (PathBuf, Vhdx, PathBuf, File) {
    let vpath = dir.join(format!("{name}-{}.vhdx", std::process::id()));
    let rpath = dir.join(format!("{name}-{}.img", std::process::id()));
    let d = Vhdx::create(
        &vpath,
        &CreateOptions {
            size,
            disk_type: DiskType::Dynamic,
            ..Default::default()
        },
    )
    .unwrap();
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&rpath)
        .unwrap();
    raw.set_len(size).unwrap();
    (vpath, d, rpath, raw)
}
