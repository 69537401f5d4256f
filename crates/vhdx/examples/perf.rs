//! Quick throughput probe of the I/O paths against the same I/O on a raw file (the comparison
//! against qemu-img lives in `vireo-bench vhdx`):
//! `cargo run --release -p vireo-vhdx --example perf -- [DIR] [THREADS]`.
//!
//! Reads are measured in alternating rounds (ours, raw, raw, ours, ...) over identical contents
//! and the median is printed, so a busy machine skews both sides alike.
//!
//! `PERF_WRITES_ONLY=1` stops after the allocating 4 KiB writes. `PERF_RECACHE=1` drops both
//! files from the page cache and reads them back once before the read rounds, so both sides
//! are served from page-cache folios of the same shape (how a file was written decides its
//! folio sizes, which moves page-cache read speed by more than our own code costs).
use std::os::unix::fs::FileExt;
use std::time::Instant;

use vireo_vhdx::Vhdx;

const SIZE: u64 = 1 << 30;
const ROUNDS: usize = 7;

mod common;
use common::run;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Alternating rounds of the same read pattern on both files: (ours, raw) median MiB/s.
fn compare_reads(
    threads: usize,
    count: u64,
    len: usize,
    offs: &(dyn Fn(u64) -> u64 + Sync),
    d: &Vhdx,
    raw: &std::fs::File,
) -> (f64, f64) {
    let ours = |b: &mut [u8], o: u64| d.read(b, o).unwrap();
    let theirs = |b: &mut [u8], o: u64| raw.read_exact_at(b, o).unwrap();
    let (mut a, mut r) = (vec![], vec![]);
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            a.push(run(threads, count, len, offs, &ours));
            r.push(run(threads, count, len, offs, &theirs));
        } else {
            r.push(run(threads, count, len, offs, &theirs));
            a.push(run(threads, count, len, offs, &ours));
        }
    }
    (median(a), median(r))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "/tmp".into());
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(4);
    let dir = std::path::Path::new(&dir);
    let (vpath, d, rpath, raw) = common::fresh_pair(dir, "perf", SIZE);

    // Allocating 4 KiB writes scattered over the disk (a prime stride of pages), then a flush.
    let n4k = 50_000u64;
    let pages = SIZE / 4096;
    let scatter = move |i: u64| (i * 7919 % pages) * 4096;
    let mib4k = (n4k * 4096) as f64 / (1 << 20) as f64;
    let t = Instant::now();
    let w_ours = run(threads, n4k, 4096, &scatter, &|b, o| d.write(b, o).unwrap());
    d.flush().unwrap();
    let f_ours = mib4k / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let w_raw = run(threads, n4k, 4096, &scatter, &|b, o| {
        raw.write_all_at(b, o).unwrap()
    });
    raw.sync_data().unwrap();
    let f_raw = mib4k / t.elapsed().as_secs_f64();
    println!(
        "4K random write (allocating): ours {w_ours:.1} MiB/s, raw {w_raw:.1} MiB/s; \
         including the flush: ours {f_ours:.1} MiB/s, raw {f_raw:.1} MiB/s"
    );
    if std::env::var_os("PERF_WRITES_ONLY").is_some() {
        drop(d);
        std::fs::remove_file(&vpath).unwrap();
        std::fs::remove_file(&rpath).unwrap();
        return;
    }

    // Fill both completely with 1 MiB sequential writes (every block allocated).
    let seq = |i: u64| i << 20;
    let mib = SIZE >> 20;
    let t = Instant::now();
    run(threads, mib, 1 << 20, &seq, &|b, o| d.write(b, o).unwrap());
    d.flush().unwrap();
    let w_ours = 1024.0 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    run(threads, mib, 1 << 20, &seq, &|b, o| {
        raw.write_all_at(b, o).unwrap()
    });
    raw.sync_data().unwrap();
    let w_raw = 1024.0 / t.elapsed().as_secs_f64();
    println!("1M sequential write + flush: ours {w_ours:.1} MiB/s, raw {w_raw:.1} MiB/s");

    if std::env::var_os("PERF_RECACHE").is_some() {
        use std::os::unix::io::AsRawFd;
        for f in [&std::fs::File::open(&vpath).unwrap(), &raw] {
            // SAFETY: advisory call on an open descriptor.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
        run(1, mib, 1 << 20, &seq, &|b, o| d.read(b, o).unwrap());
        run(1, mib, 1 << 20, &seq, &|b, o| {
            raw.read_exact_at(b, o).unwrap()
        });
    }
    let (a, r) = compare_reads(threads, mib * 2, 1 << 20, &|i| (i % mib) << 20, &d, &raw);
    println!(
        "1M sequential read ({threads} threads, median of {ROUNDS}): ours {a:.0} MiB/s, raw {r:.0} MiB/s, ratio {:.2}",
        a / r
    );
    let (a, r) = compare_reads(1, mib, 1 << 20, &seq, &d, &raw);
    println!(
        "1M sequential read (1 thread, median of {ROUNDS}): ours {a:.0} MiB/s, raw {r:.0} MiB/s, ratio {:.2}",
        a / r
    );
    let (a, r) = compare_reads(threads, 200_000, 4096, &scatter, &d, &raw);
    println!(
        "4K random read ({threads} threads, median of {ROUNDS}): ours {a:.0} MiB/s, raw {r:.0} MiB/s, ratio {:.2}",
        a / r
    );
    drop(d);
    std::fs::remove_file(&vpath).unwrap();
    std::fs::remove_file(&rpath).unwrap();
}
