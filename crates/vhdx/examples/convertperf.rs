//! Times one raw -> dynamic VHDX convert of an existing file, fsync included (for perf/strace):
//! `cargo run --release -p vireo-vhdx --example convertperf -- SRC DST` (DST must not exist;
//! `THREADS=n` sets the reader threads). Prints the copy phase apart from the final flush.
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use vireo_vhdx::convert::{convert, ConvertOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, src, dst] = args.as_slice() else {
        eprintln!("usage: convertperf SRC DST");
        std::process::exit(2);
    };
    let t = Instant::now();
    let copied = std::cell::Cell::new(None);
    let r = convert(
        src.as_ref(),
        dst.as_ref(),
        &ConvertOptions {
            threads: std::env::var("THREADS").map_or(0, |v| v.parse().expect("THREADS")),
            ..ConvertOptions::default()
        },
        &|done, total| {
            if done == total && copied.get().is_none() {
                copied.set(Some(t.elapsed().as_secs_f64()));
            }
        },
        &AtomicBool::new(false),
    )
    .expect("convert");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{:.2} s (copy {:.2} s), {:.0} MiB/s, written {}",
        secs,
        copied.get().unwrap_or(0.0),
        r.bytes_scanned as f64 / secs / (1 << 20) as f64,
        r.bytes_written
    );
}
