//! The `vhdx` benchmark: our VHDX I/O vs `qemu-img bench -f vhdx` and vs a raw file, and our
//! convert vs `qemu-img convert`, all in one run on the same machine.
//!
//! I/O pattern (same for every contender, as `qemu-img bench` defines it): request `i` goes to
//! `(offset + i * step) % image_size`; a large step scatters 4 KiB requests over the whole disk
//! (every block gets allocated), a step equal to the request size is sequential. Requests run
//! `depth` at a time (our threads, qemu's queue depth); writes end with one flush.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use vireo_block::{BlockBackend, RawFile};
use vireo_vhdx::convert::{self, ConvertOptions, Format, OutputType};
use vireo_vhdx::{CreateOptions, DiskType, Vhdx};

#[derive(clap::Args)]
pub struct VhdxArgs {
    /// Scale factor for request counts and the convert file (1.0 = the documented run).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Requests in flight (our threads; qemu-img bench -d).
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Directory for the scratch images (needs ~5 GiB free at scale 1).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

struct Pattern {
    name: &'static str,
    size: u64,
    buf: usize,
    count: u64,
    step: u64,
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

pub fn run(args: VhdxArgs) -> Result<(), Box<dyn std::error::Error>> {
    let dir = match &args.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir_in("/var/tmp")?,
    };
    let scaled = |n: u64| ((n as f64 * args.scale) as u64).max(16);
    let patterns = [
        Pattern {
            name: "4K random",
            size: 2 * GIB,
            buf: 4096,
            count: scaled(50_000),
            // A prime number of 4 KiB pages: consecutive requests land in different blocks.
            step: 4096 * 7919,
        },
        Pattern {
            name: "1M sequential",
            size: 2 * GIB,
            buf: MIB as usize,
            count: scaled(1536),
            step: MIB,
        },
    ];
    let mut rows: Vec<(String, f64, f64, f64)> = Vec::new(); // case, ours, qemu, raw (MiB/s)
    let mut qemu_ratios = Vec::new();
    let mut raw_read_ratios = Vec::new();
    for p in &patterns {
        let ours_path = dir.path().join("ours.vhdx");
        let qemu_path = dir.path().join("qemu.vhdx");
        let raw_path = dir.path().join("raw.img");
        for f in [&ours_path, &qemu_path, &raw_path] {
            let _ = std::fs::remove_file(f);
        }
        let ours = Vhdx::create(
            &ours_path,
            &CreateOptions {
                size: p.size,
                disk_type: DiskType::Dynamic,
                ..CreateOptions::default()
            },
        )?;
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "subformat=dynamic,block_size=32M",
            qemu_path.to_str().unwrap(),
            &p.size.to_string(),
        ])?;
        std::fs::File::create(&raw_path)?.set_len(p.size)?;
        let raw = RawFile::open(&raw_path, false)?;
        for write in [true, false] {
            let ours_mibs = drive(&ours, p, write, args.depth)?;
            let raw_mibs = drive(&raw, p, write, args.depth)?;
            let qemu_mibs = qemu_bench(&qemu_path, p, write, args.depth)?;
            let case = format!("{} {}", p.name, if write { "write" } else { "read" });
            qemu_ratios.push(ours_mibs / qemu_mibs);
            if !write {
                raw_read_ratios.push(ours_mibs / raw_mibs);
            }
            rows.push((case, ours_mibs, qemu_mibs, raw_mibs));
        }
    }

    // (c) convert a 2 GiB non-sparse raw file of incompressible-looking data.
    let src = dir.path().join("convert-src.img");
    let convert_size = ((2 * GIB) as f64 * args.scale.min(1.0)) as u64 / MIB * MIB;
    make_random_file(&src, convert_size.max(64 * MIB))?;
    let qemu_dst = dir.path().join("convert-qemu.vhdx");
    let ours_dst = dir.path().join("convert-ours.vhdx");
    let t = Instant::now();
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "-o",
        "subformat=dynamic",
        src.to_str().unwrap(),
        qemu_dst.to_str().unwrap(),
    ])?;
    sync_file(&qemu_dst)?;
    let qemu_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    convert::convert(
        &src,
        &ours_dst,
        &ConvertOptions {
            format: Format::Vhdx,
            output_type: OutputType::Dynamic,
            ..ConvertOptions::default()
        },
        &|_, _| {},
        &AtomicBool::new(false),
    )?;
    let ours_secs = t.elapsed().as_secs_f64();
    let mib = convert_size as f64 / MIB as f64;
    let (ours_c, qemu_c) = (mib / ours_secs, mib / qemu_secs);
    qemu_ratios.push(ours_c / qemu_c);
    rows.push(("convert raw->vhdx".into(), ours_c, qemu_c, f64::NAN));
    // Both outputs must hold the same data, or the timing means nothing.
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "vhdx",
        "-F",
        "vhdx",
        ours_dst.to_str().unwrap(),
        qemu_dst.to_str().unwrap(),
    ])?;

    println!(
        "{:<22} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "case (MiB/s)", "vireo vhdx", "qemu vhdx", "raw file", "vs qemu", "vs raw"
    );
    for (case, ours, qemu, raw) in &rows {
        println!(
            "{case:<22} {ours:>12.1} {qemu:>12.1} {:>12} {:>10.2} {:>10}",
            if raw.is_nan() {
                "-".into()
            } else {
                format!("{raw:.1}")
            },
            ours / qemu,
            if raw.is_nan() {
                "-".into()
            } else {
                format!("{:.2}", ours / raw)
            },
        );
    }
    println!(
        "(depth {}, writes end with a flush, page cache on for all: qemu-img -t writeback)",
        args.depth
    );
    let min = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "vhdx_vs_qemu={:.2} vhdx_vs_raw={:.2}",
        min(&qemu_ratios),
        min(&raw_read_ratios)
    );
    Ok(())
}

/// Runs pattern `p` on `disk` with `depth` threads; returns MiB/s.
fn drive(
    disk: &dyn BlockBackend,
    p: &Pattern,
    write: bool,
    depth: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let next = AtomicU64::new(0);
    let failed = std::sync::Mutex::new(None);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..depth {
            s.spawn(|| {
                let mut buf = vec![0xa5u8; p.buf];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= p.count {
                        break;
                    }
                    let off = (i * p.step) % p.size;
                    let off = off.min(p.size - p.buf as u64);
                    let r = if write {
                        disk.write_at(&buf, off)
                    } else {
                        disk.read_at(&mut buf, off)
                    };
                    if let Err(e) = r {
                        failed.lock().unwrap().get_or_insert(e.to_string());
                        break;
                    }
                }
            });
        }
    });
    if write {
        disk.flush()?;
    }
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e.into());
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((p.count * p.buf as u64) as f64 / MIB as f64 / secs)
}

fn qemu_bench(
    image: &Path,
    p: &Pattern,
    write: bool,
    depth: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut args = vec![
        "bench".to_string(),
        "-f".into(),
        "vhdx".into(),
        "-t".into(),
        "writeback".into(),
        "-c".into(),
        p.count.to_string(),
        "-d".into(),
        depth.to_string(),
        "-s".into(),
        p.buf.to_string(),
        "-S".into(),
        p.step.to_string(),
    ];
    if write {
        args.extend([
            "-w".into(),
            "--pattern".into(),
            "165".into(),
            "--flush-interval".into(),
            p.count.to_string(),
        ]);
    }
    args.push(image.to_str().unwrap().into());
    let start = Instant::now();
    let out = Command::new("qemu-img").args(&args).output()?;
    let wall = start.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!(
            "qemu-img {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    // Writes count until the data is durable, as ours do (drive() ends with a flush): wall time
    // of the run plus an fsync of the image afterwards (a no-op if qemu's own flush did it).
    // Reads use qemu's own "Run completed in 1.234 seconds.", which excludes start-up.
    let secs = if write {
        sync_file(image)?;
        start.elapsed().as_secs_f64()
    } else {
        let text = String::from_utf8_lossy(&out.stdout);
        text.split("Run completed in ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(wall)
    };
    Ok((p.count * p.buf as u64) as f64 / MIB as f64 / secs)
}

fn qemu_img(args: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let out = Command::new("qemu-img").args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Writes `size` bytes of xorshift data (no zero runs, so nothing is skipped) and syncs it.
fn make_random_file(path: &Path, size: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path)?);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..size / MIB {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    f.into_inner()?.sync_all()
}
