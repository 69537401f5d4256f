//! Trim/rewrite churn: ROUNDS times "write 256 MiB, trim it, flush" into a 1 GiB dynamic
//! disk (each round a different quarter, 1 MiB writes, default 32 MiB blocks), then a clean
//! close. Prints the file's length and the space it holds on disk after each round and after
//! the close. Uses only the public API, so the same file measures older versions too:
//! `cargo run --release -p vireo-vhdx --example churn -- [DIR] [ROUNDS]`.
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vireo_vhdx::{CreateOptions, DiskType, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 1 << 30;
const SPAN: u64 = 256 * MIB;

fn sizes(p: &Path) -> (u64, u64) {
    let m = std::fs::metadata(p).unwrap();
    (m.len() / MIB, m.blocks() * 512 / MIB)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "/var/tmp".into());
    let rounds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(20);
    let path = Path::new(&dir).join(format!("churn-{}.vhdx", std::process::id()));
    let d = Vhdx::create(
        &path,
        &CreateOptions {
            size: SIZE,
            disk_type: DiskType::Dynamic,
            ..Default::default()
        },
    )
    .unwrap();
    let buf: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 | 1).collect();
    for round in 0..rounds {
        let base = (round % (SIZE / SPAN)) * SPAN;
        for off in (base..base + SPAN).step_by(MIB as usize) {
            d.write(&buf, off).unwrap();
        }
        d.discard(base, SPAN).unwrap();
        d.flush().unwrap();
        let (len, held) = sizes(&path);
        println!(
            "round {:2}: file {len:5} MiB, on disk {held:4} MiB",
            round + 1
        );
    }
    drop(d);
    let (len, held) = sizes(&path);
    println!("closed:   file {len:5} MiB, on disk {held:4} MiB");
    std::fs::remove_file(&path).unwrap();
}
