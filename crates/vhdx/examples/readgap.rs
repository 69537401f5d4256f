//! Paired read probe in the shape of `vireo-bench vhdx`: both files written with the bench's
//! pattern (4 KiB scattered or 1 MiB sequential), page cache dropped, one warm-up pass each,
//! then many short alternating samples (ours, raw, raw, ours, ...). Prints the median of the
//! per-pair ratios, which a busy machine disturbs far less than one long sample per side:
//! `cargo run --release -p vireo-vhdx --example readgap -- [DIR] [4k|1m] [PAIRS]`.
//!
//! Knobs for the page-cache experiments behind the bench's warm-up rule: `READGAP_NO_DROP=1`
//! reads what the writes left cached; `READGAP_RAW_FIRST=1` warms the raw file first (default:
//! ours first); `READGAP_SLICES=16` warms both in 16 interleaved slices; `READGAP_FINCORE=1`
//! prints `fincore` of both files after the warm-up. Whichever file is warmed second reads
//! faster (~10%, page-cache memory placement in this VM), whatever the format.
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::Instant;

const SIZE: u64 = 2 << 30;
const THREADS: usize = 4;

mod common;
use common::run;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "/var/tmp".into());
    let shape = args.next().unwrap_or_else(|| "4k".into());
    let pairs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(15);
    let dir = std::path::Path::new(&dir);
    let (vpath, d, rpath, raw) = common::fresh_pair(dir, "readgap", SIZE);
    let (count, len, step): (u64, usize, u64) = if shape == "1m" {
        (1536, 1 << 20, 1 << 20)
    } else {
        (50_000, 4096, 4096 * 7919)
    };
    let offs = move |i: u64| ((i % count) * step % SIZE).min(SIZE - len as u64);
    run(THREADS, count, len, &offs, &|b, o| d.write(b, o).unwrap());
    d.flush().unwrap();
    run(THREADS, count, len, &offs, &|b, o| {
        raw.write_all_at(b, o).unwrap()
    });
    raw.sync_data().unwrap();
    let ours = |b: &mut [u8], o: u64| d.read(b, o).unwrap();
    let theirs = |b: &mut [u8], o: u64| raw.read_exact_at(b, o).unwrap();
    if std::env::var_os("READGAP_NO_DROP").is_none() {
        for f in [&std::fs::File::open(&vpath).unwrap(), &raw] {
            f.sync_all().unwrap();
            // SAFETY: advisory call on an open descriptor.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
        if let Some(k) = std::env::var("READGAP_SLICES")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Warm both in k interleaved slices of the pattern, order alternating per slice.
            for j in 0..k {
                let (a, b) = (count * j / k, count * (j + 1) / k);
                let sl = move |i: u64| offs(a + i);
                if j % 2 == 0 {
                    run(THREADS, b - a, len, &sl, &ours);
                    run(THREADS, b - a, len, &sl, &theirs);
                } else {
                    run(THREADS, b - a, len, &sl, &theirs);
                    run(THREADS, b - a, len, &sl, &ours);
                }
            }
        } else if std::env::var_os("READGAP_RAW_FIRST").is_some() {
            run(THREADS, count, len, &offs, &theirs);
            run(THREADS, count, len, &offs, &ours);
        } else {
            run(THREADS, count, len, &offs, &ours);
            run(THREADS, count, len, &offs, &theirs);
        }
    }
    if std::env::var_os("READGAP_FINCORE").is_some() {
        let out = std::process::Command::new("fincore")
            .arg(&vpath)
            .arg(&rpath)
            .output()
            .unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    // A sample of ~0.25 s of ours.
    let t = Instant::now();
    run(THREADS, count, len, &offs, &ours);
    let passes = ((0.25 / t.elapsed().as_secs_f64()).ceil() as u64).max(1);
    let mut ratios = vec![];
    let (mut a, mut r) = (vec![], vec![]);
    for p in 0..pairs {
        let (x, y) = if p % 2 == 0 {
            let x = run(THREADS, count * passes, len, &offs, &ours);
            (x, run(THREADS, count * passes, len, &offs, &theirs))
        } else {
            let y = run(THREADS, count * passes, len, &offs, &theirs);
            (run(THREADS, count * passes, len, &offs, &ours), y)
        };
        ratios.push(x / y);
        a.push(x);
        r.push(y);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{shape} read: ours {:.0} raw {:.0} MiB/s (medians); median pair ratio {:.3}; ratios {:?}",
        med(a),
        med(r),
        med(ratios.clone()),
        ratios
            .iter()
            .map(|x| (x * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
    drop(d);
    std::fs::remove_file(&vpath).unwrap();
    std::fs::remove_file(&rpath).unwrap();
}
