//! How long a live merge takes and how long it stalls the guest's I/O:
//! `cargo run --release -p vireo-vhdx --example livemerge -- [DIR] [CHILD_MIB] [THREADS]`.
//!
//! A 1 GiB base holding 256 MiB of data under a child holding `CHILD_MIB` (default 256) of its
//! own; `THREADS` (default 4) writers do 4 KiB random writes (a flush every 64) before, during
//! and after `merge_live`. Prints the merge time, the MiB it examined and copied, the writes
//! done meanwhile and the slowest write and flush (the pivot's pause shows in both).
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 1 << 30;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| "/tmp".into()));
    let child_mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);
    let threads: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(4);
    let id = std::process::id();
    let base = dir.join(format!("livemerge-base-{id}.vhdx"));
    let child = dir.join(format!("livemerge-child-{id}.avhdx"));
    let chunk = vec![0x5au8; MIB as usize];
    let b = Vhdx::create(
        &base,
        &CreateOptions {
            size: SIZE,
            disk_type: DiskType::Dynamic,
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..256 {
        b.write(&chunk, i * 4 * MIB).unwrap();
    }
    drop(b);
    let c = Vhdx::create(
        &child,
        &CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(base.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..child_mib {
        c.write(&chunk, (i * 3 * MIB) % SIZE).unwrap();
    }
    drop(c);
    let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();

    let stop = AtomicBool::new(false);
    let merging = AtomicBool::new(false);
    let during = AtomicU64::new(0);
    let slowest = Mutex::new((Duration::ZERO, false));
    let slowest_flush = Mutex::new(Duration::ZERO);
    let copied = AtomicU64::new(0);
    let no = AtomicBool::new(false);
    let merge_time = std::thread::scope(|s| {
        for t in 0..threads {
            let (d, stop, merging, during) = (&d, &stop, &merging, &during);
            let (slowest, slowest_flush) = (&slowest, &slowest_flush);
            s.spawn(move || {
                let buf = vec![t as u8; 4096];
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % (SIZE / 4096)) * 4096;
                    let m = merging.load(Ordering::Relaxed);
                    let t0 = Instant::now();
                    d.write(&buf, off).unwrap();
                    let took = t0.elapsed();
                    n += 1;
                    if n.is_multiple_of(64) {
                        let f0 = Instant::now();
                        d.flush().unwrap();
                        let f = f0.elapsed();
                        let mut w = slowest_flush.lock().unwrap();
                        *w = (*w).max(f);
                    }
                    if m {
                        during.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut w = slowest.lock().unwrap();
                    if took > w.0 {
                        *w = (took, m);
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(200));
        merging.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        let r = d.merge_live(&|_, total| copied.store(total, Ordering::Relaxed), &no);
        let took = t0.elapsed();
        merging.store(false, Ordering::Relaxed);
        r.unwrap();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        took
    });
    let (slow, in_merge) = *slowest.lock().unwrap();
    let mib = copied.load(Ordering::Relaxed) / MIB;
    println!(
        "live merge of {child_mib} MiB under {threads} 4K writers: {:.2} s, {mib} MiB examined \
         and copied, {} writes meanwhile; slowest write {:.1} ms ({}), slowest flush {:.1} ms",
        merge_time.as_secs_f64(),
        during.load(Ordering::Relaxed),
        slow.as_secs_f64() * 1000.0,
        if in_merge {
            "during the merge"
        } else {
            "outside the merge"
        },
        slowest_flush.lock().unwrap().as_secs_f64() * 1000.0
    );
    drop(d);
    let _ = std::fs::remove_file(&base);
    let _ = std::fs::remove_file(&child);
}
