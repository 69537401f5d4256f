//! The request driver the I/O probes share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

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
