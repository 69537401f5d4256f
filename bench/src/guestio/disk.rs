//! The disk half: the same image files under `vireo run --disk` and under QEMU microvm with
//! virtio-blk on an iothread in each aio × cache mode; every VM runs every case once per round.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vireo_probe_image::qemu::QemuProbeConfig;

use super::vm::{field, Vm};

pub struct Case {
    pub name: &'static str,
    pub op: &'static str,
    pub bs: &'static str,
    pub qd: u32,
    /// 4 KiB random cases are compared on IOPS; sequential ones against the memcpy ceiling.
    pub small: bool,
}

pub const CASES: &[Case] = &[
    Case {
        name: "4K randread QD1",
        op: "randread",
        bs: "4K",
        qd: 1,
        small: true,
    },
    Case {
        name: "4K randwrite QD1",
        op: "randwrite",
        bs: "4K",
        qd: 1,
        small: true,
    },
    Case {
        name: "4K randread QD32",
        op: "randread",
        bs: "4K",
        qd: 32,
        small: true,
    },
    Case {
        name: "4K randwrite QD32",
        op: "randwrite",
        bs: "4K",
        qd: 32,
        small: true,
    },
    Case {
        name: "1M read QD4",
        op: "read",
        bs: "1M",
        qd: 4,
        small: false,
    },
    Case {
        name: "1M write QD4",
        op: "write",
        bs: "1M",
        qd: 4,
        small: false,
    },
];

#[derive(Clone, Copy, Default, Debug)]
pub struct Result1 {
    pub iops: f64,
    pub mib_s: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    /// Guest notifications (VM exits) per request.
    pub kicks_per_io: f64,
}

/// One VMM setup that serves a disk: Vireo, or QEMU in one aio/cache mode.
#[derive(Clone)]
pub enum Setup {
    Vireo,
    Qemu {
        aio: &'static str,
        cache: &'static str,
    },
}

impl Setup {
    pub fn all() -> Vec<Setup> {
        let mut v = vec![Setup::Vireo];
        for aio in ["io_uring", "threads"] {
            for cache in ["none", "writeback"] {
                v.push(Setup::Qemu { aio, cache });
            }
        }
        v
    }

    pub fn label(&self) -> String {
        match self {
            Setup::Vireo => "vireo".into(),
            Setup::Qemu { aio, cache } => format!("qemu {aio}/{cache}"),
        }
    }
}

pub struct Image {
    pub label: &'static str,
    pub path: PathBuf,
    pub format: &'static str,
}

/// Puts `image` in the same page-cache state before every VM boots: written back, dropped,
/// then read once in 1 MiB pieces. Without it each VMM inherits whatever the previous one left
/// (dirty pages, and page-cache folios of the sizes its writes made), and 4 KiB cases swung
/// 10 x between runs for that reason alone (docs/datapath.md, "What bounds it").
pub fn same_cache_state(image: &Path) -> Result<(), String> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let err = |e: std::io::Error| format!("{}: {e}", image.display());
    let mut f = File::open(image).map_err(err)?;
    f.sync_data().map_err(err)?;
    // SAFETY: posix_fadvise on a descriptor we own; it only drops clean cached pages.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(err(std::io::Error::from_raw_os_error(r)));
    }
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).map_err(err)? > 0 {}
    Ok(())
}

/// A raw file filled with data (so nothing reads holes) and a VHDX converted from it.
pub fn make_images(dir: &Path, mib: u64) -> Result<Vec<Image>, String> {
    let raw = dir.join("disk.raw");
    let mut f = File::create(&raw).map_err(|e| format!("{}: {e}", raw.display()))?;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        vireo_probe_image::pattern::fill(&mut block, 0x5eed, i << 20);
        f.write_all(&block)
            .map_err(|e| format!("{}: {e}", raw.display()))?;
    }
    f.sync_all()
        .map_err(|e| format!("{}: {e}", raw.display()))?;
    let vhdx = dir.join("disk.vhdx");
    let out = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic",
        ])
        .arg(&raw)
        .arg(&vhdx)
        .output()
        .map_err(|e| format!("qemu-img: {e} (install qemu-utils)"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img convert to {}: {}",
            vhdx.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(vec![
        Image {
            label: "raw",
            path: raw,
            format: "raw",
        },
        Image {
            label: "vhdx",
            path: vhdx,
            format: "vhdx",
        },
    ])
}

pub fn qemu_config(
    qemu: &Path,
    memory_mib: u32,
    image: &Image,
    aio: &str,
    cache: &str,
) -> QemuProbeConfig {
    let mut c = QemuProbeConfig::new(qemu, memory_mib);
    // The drive is given here rather than through `QemuProbeConfig::disk` (always raw, no
    // iothread): an iothread with QEMU's default adaptive polling is the fair setup.
    c.extra_args = vec![
        "-object".into(),
        "iothread,id=io0".into(),
        "-drive".into(),
        format!(
            "file={},if=none,id=d0,format={},aio={aio},cache={cache}",
            image.path.display(),
            image.format
        ),
        "-device".into(),
        "virtio-blk-device,drive=d0,iothread=io0".into(),
    ];
    c
}

/// Runs `cases` for `secs` seconds each on a booted VM whose disk 0 is the image.
pub fn run_cases(mut vm: Vm, cases: &[&Case], secs: u32) -> Result<Vec<Result1>, String> {
    let timeout = Duration::from_secs(u64::from(secs) + 60);
    // Calibrate the TSC before the first measured case.
    vm.command("TSC", Duration::from_secs(10))?;
    let mut out = Vec::new();
    for c in cases {
        let cmd = format!("DISK 0 BENCH {} {} {} {secs}", c.op, c.bs, c.qd);
        let a = vm.command(&cmd, timeout)?;
        out.push(Result1 {
            iops: field(&a, "iops")?,
            mib_s: field(&a, "mib_s")?,
            p50: field(&a, "p50_us")?,
            p99: field(&a, "p99_us")?,
            p999: field(&a, "p999_us")?,
            kicks_per_io: field(&a, "kicks")? / field(&a, "ios")?.max(1.0),
        });
    }
    Ok(out)
}

/// Host memcpy of 1 MiB blocks out of a `mib`-MiB buffer: the ceiling for 1 MiB sequential I/O
/// that only copies page-cache pages into guest memory.
pub fn memcpy_ceiling_mib_s(mib: usize) -> f64 {
    let src = vec![0x5au8; mib << 20];
    let mut dst = vec![0u8; 8 << 20];
    let started = Instant::now();
    let mut copied = 0usize;
    while started.elapsed() < Duration::from_millis(500) {
        for (i, chunk) in src.chunks(1 << 20).enumerate() {
            let at = (i % 8) << 20;
            dst[at..at + (1 << 20)].copy_from_slice(chunk);
            copied += 1;
        }
    }
    std::hint::black_box(&dst);
    copied as f64 / started.elapsed().as_secs_f64()
}
