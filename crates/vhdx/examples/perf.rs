//! Quick throughput probe of the I/O paths (the real comparison against qemu-img lives in
//! `vireo-bench vhdx`): `cargo run --release -p vireo-vhdx --example perf -- DIR`.
use std::time::Instant;

use vireo_vhdx::{CreateOptions, DiskType, Vhdx};

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "/tmp".into());
    let path = std::path::Path::new(&dir).join(format!("perf-{}.vhdx", std::process::id()));
    let size = 1u64 << 30;
    let d = Vhdx::create(
        &path,
        &CreateOptions {
            size,
            disk_type: DiskType::Dynamic,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let buf4k = vec![0xabu8; 4096];
    let n = 100_000;
    let offs: Vec<u64> = (0..n).map(|_| next() % (size / 4096) * 4096).collect();
    let t = Instant::now();
    for &o in &offs {
        d.write(&buf4k, o).unwrap();
    }
    d.flush().unwrap();
    let w = t.elapsed().as_secs_f64();
    let mut rb = vec![0u8; 4096];
    let t = Instant::now();
    for &o in &offs {
        d.read(&mut rb, o).unwrap();
    }
    let r = t.elapsed().as_secs_f64();
    println!(
        "4k random: write {:.0} IOPS, read {:.0} IOPS",
        n as f64 / w,
        n as f64 / r
    );
    let buf1m = vec![0xcdu8; 1 << 20];
    let t = Instant::now();
    for i in 0..1024u64 {
        d.write(&buf1m, i << 20).unwrap();
    }
    d.flush().unwrap();
    let w = t.elapsed().as_secs_f64();
    let mut rb = vec![0u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..3 {
        for i in 0..1024u64 {
            d.read(&mut rb, i << 20).unwrap();
        }
    }
    let r = t.elapsed().as_secs_f64();
    println!(
        "1M sequential: write {:.0} MB/s, read {:.0} MB/s",
        1024.0 / w,
        3072.0 / r
    );
    drop(d);
    std::fs::remove_file(&path).unwrap();
    use std::os::unix::fs::FileExt;
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    raw.set_len(size).unwrap();
    let t = Instant::now();
    for &o in &offs {
        raw.write_all_at(&buf4k, o).unwrap();
    }
    raw.sync_data().unwrap();
    let w = t.elapsed().as_secs_f64();
    let mut rb = vec![0u8; 4096];
    let t = Instant::now();
    for &o in &offs {
        raw.read_exact_at(&mut rb, o).unwrap();
    }
    let r = t.elapsed().as_secs_f64();
    println!(
        "raw 4k random: write {:.0} IOPS, read {:.0} IOPS",
        n as f64 / w,
        n as f64 / r
    );
    let mut rb = vec![0u8; 1 << 20];
    for i in 0..1024u64 {
        raw.write_all_at(&buf1m, i << 20).unwrap();
    }
    let t = Instant::now();
    for _ in 0..3 {
        for i in 0..1024u64 {
            raw.read_exact_at(&mut rb, i << 20).unwrap();
        }
    }
    println!(
        "raw 1M sequential read {:.0} MB/s",
        3072.0 / t.elapsed().as_secs_f64()
    );
    std::fs::remove_file(&path).unwrap();
}
