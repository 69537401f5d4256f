//! Many threads on one disk at once: interleaved allocating writes into shared blocks,
//! reads and flushes must all land.
mod common;
use std::sync::Arc;

use common::*;
use vireo_vhdx::{CreateOptions, DiskType, Vhdx};

const MIB: u64 = 1 << 20;

fn hammer(d: Arc<Vhdx>) {
    const THREADS: u64 = 6;
    const STRIPE: u64 = 64 * 1024;
    // Thread t owns every THREADS-th 64 KiB stripe, so threads race on allocating each block.
    let size = d.virtual_size();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                let mut off = t * STRIPE;
                let mut i = 0;
                while off < size {
                    d.write(&pattern(STRIPE as usize, t as u8), off).unwrap();
                    if i % 16 == 0 {
                        d.flush().unwrap();
                    }
                    assert_eq!(
                        read(&d, off, STRIPE as usize),
                        pattern(STRIPE as usize, t as u8)
                    );
                    off += THREADS * STRIPE;
                    i += 1;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    d.flush().unwrap();
    for s in 0..size / STRIPE {
        assert_eq!(
            read(&d, s * STRIPE, STRIPE as usize),
            pattern(STRIPE as usize, (s % THREADS) as u8),
            "stripe {s}"
        );
    }
}

#[test]
fn parallel_writers_dynamic() {
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "c.vhdx",
        &opts(24 * MIB, MIB as u32, DiskType::Dynamic),
    );
    hammer(Arc::new(d));
    assert!(Vhdx::check(&p, false).unwrap().is_clean());
}

#[test]
fn parallel_writers_differencing() {
    let dir = tmpdir();
    let (base, d) = create(
        dir.path(),
        "base.vhdx",
        &opts(24 * MIB, MIB as u32, DiskType::Dynamic),
    );
    d.write(&vec![0x55; 24 * MIB as usize], 0).unwrap();
    drop(d);
    let p = dir.path().join("child.vhdx");
    let c = Vhdx::create(
        &p,
        &CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(base),
            block_size: MIB as u32,
            ..Default::default()
        },
    )
    .unwrap();
    hammer(Arc::new(c));
    assert!(Vhdx::check(&p, false).unwrap().is_clean());
}
