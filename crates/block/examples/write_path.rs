//! Measures how this host's kernel takes buffered 4 KiB random writes and 1 MiB sequential
//! writes into a page-cached image: one `pwrite` at a time, `pwritev2(RWF_NOWAIT)` (how often
//! the kernel can finish it without blocking), and a batch of 32 through io_uring (and whether
//! the batch went to io-wq worker threads: `iou-wrk-*` threads appear in /proc/self/task).
//!
//! `cargo run --release -p vireo-block --example write_path -- [DIR] [MiB]` (default /var/tmp,
//! 256 MiB); docs/datapath.md quotes its figures.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

const ROUNDS: usize = 20_000;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "/var/tmp".into());
    let mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);
    let path = std::path::Path::new(&dir).join(format!("write-path-{}.img", std::process::id()));
    // VIREO_PREFILL_CHUNK=4096 fills the file in 4 KiB writes (small page-cache folios) instead
    // of 1 MiB ones (large folios), to compare what a 4 KiB rewrite of each costs.
    let chunk = std::env::var("VIREO_PREFILL_CHUNK")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1usize << 20);
    let file = prefill(&path, mib, chunk)?;
    let _ = std::fs::remove_file(&path);
    let blocks = mib * 256;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_offset = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * 4096
    };
    let buf = vec![0xa5u8; 1 << 20];
    let fd = file.as_raw_fd();

    let t = Instant::now();
    for _ in 0..ROUNDS {
        file.write_at(&buf[..4096], next_offset())?;
    }
    report("4K pwrite, one at a time", ROUNDS, t.elapsed());

    let t = Instant::now();
    std::thread::scope(|s| {
        for seed in 1..=2u64 {
            let file = &file;
            let buf = &buf;
            s.spawn(move || {
                let mut x = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
                for _ in 0..ROUNDS / 2 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let _ = file.write_at(&buf[..4096], (x % blocks) * 4096);
                }
            });
        }
    });
    report("4K pwrite from 2 threads", ROUNDS, t.elapsed());

    let (mut ok, mut again) = (0usize, 0usize);
    let t = Instant::now();
    for _ in 0..ROUNDS {
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut _,
            iov_len: 4096,
        };
        // SAFETY: one iovec over `buf`, which outlives the call.
        let rc = unsafe { libc::pwritev2(fd, &iov, 1, next_offset() as i64, libc::RWF_NOWAIT) };
        if rc == 4096 {
            ok += 1;
        } else {
            again += 1;
        }
    }
    report("4K pwritev2(RWF_NOWAIT)", ROUNDS, t.elapsed());
    println!("  completed without blocking: {ok}, EAGAIN/short: {again}");

    let before = io_wq_threads();
    let mut ring = IoUring::new(64)?;
    let t = Instant::now();
    for _ in 0..ROUNDS / 32 {
        let offsets: Vec<u64> = (0..32).map(|_| next_offset()).collect();
        batch(&mut ring, fd, &buf[..4096], &offsets)?;
    }
    report(
        "4K io_uring WRITE, batches of 32",
        ROUNDS / 32 * 32,
        t.elapsed(),
    );
    println!(
        "  io-wq worker threads: {before} before, {} after",
        io_wq_threads()
    );

    let seq_rounds = (mib as usize).min(256) * 4;
    let t = Instant::now();
    for i in 0..seq_rounds {
        file.write_at(&buf, (i as u64 % mib) << 20)?;
    }
    report("1M pwrite sequential", seq_rounds, t.elapsed());
    let t = Instant::now();
    for i in 0..seq_rounds {
        file.write_at(&buf, (i as u64 % mib) << 20)?;
        if i % 8 == 7 {
            // What VHDX's `Layer::wrote` does every 8 MiB of large writes.
            // SAFETY: sync_file_range on our own descriptor, whole file.
            unsafe { libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        }
    }
    report(
        "1M pwrite sequential + sync_file_range(WRITE) every 8 MiB",
        seq_rounds,
        t.elapsed(),
    );
    let t = Instant::now();
    for i in 0..seq_rounds / 4 {
        let offsets: Vec<u64> = (0..4).map(|k| ((i * 4 + k) as u64 % mib) << 20).collect();
        batch(&mut ring, fd, &buf, &offsets)?;
    }
    report(
        "1M io_uring WRITE, batches of 4",
        seq_rounds / 4 * 4,
        t.elapsed(),
    );
    println!("  io-wq worker threads now: {}", io_wq_threads());

    // What VHDX's `Layer::reserve` does once per 4 MiB of a payload block it first writes.
    let units = mib / 4;
    let t = Instant::now();
    for u in 0..units {
        // SAFETY: fallocate on our own descriptor inside the file; failure is reported below.
        let rc = unsafe { libc::fallocate(fd, 0, (u * (4 << 20)) as i64, 4 << 20) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    report(
        "fallocate of an allocated 4 MiB unit",
        units as usize,
        t.elapsed(),
    );
    Ok(())
}

fn prefill(path: &std::path::Path, mib: u64, chunk: usize) -> std::io::Result<File> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let block = vec![0x11u8; chunk];
    for _ in 0..(mib << 20) / chunk as u64 {
        f.write_all(&block)?;
    }
    f.sync_all()?;
    Ok(f)
}

/// Writes `data` at each offset through the ring and waits for all of them.
fn batch(ring: &mut IoUring, fd: i32, data: &[u8], offsets: &[u64]) -> std::io::Result<()> {
    for (i, &off) in offsets.iter().enumerate() {
        let sqe = opcode::Write::new(types::Fd(fd), data.as_ptr(), data.len() as u32)
            .offset(off)
            .build()
            .user_data(i as u64);
        // SAFETY: `data` outlives the operation: every completion is reaped below.
        unsafe { ring.submission().push(&sqe) }.map_err(std::io::Error::other)?;
    }
    let mut reaped = 0;
    while reaped < offsets.len() {
        ring.submit_and_wait(1)?;
        for cqe in ring.completion() {
            if cqe.result() < 0 {
                return Err(std::io::Error::from_raw_os_error(-cqe.result()));
            }
            reaped += 1;
        }
    }
    Ok(())
}

fn io_wq_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("iou-wrk"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn report(what: &str, n: usize, took: Duration) {
    let per = took.as_secs_f64() * 1e6 / n as f64;
    println!(
        "{what}: {n} in {:.0} ms = {:.0}/s, {per:.1} us each",
        took.as_secs_f64() * 1e3,
        n as f64 / took.as_secs_f64()
    );
}
