//! The `guestio` benchmark: I/O as the guest sees it. The probe guest runs `DISK 0 BENCH` under
//! `vireo run` and under QEMU microvm (virtio-blk on an iothread, every aio × cache mode; QEMU's
//! best per case counts) on the same image files, and two probes exchange frames through a Vireo
//! switch (vhost-user) and through TAPs on a Linux bridge (QEMU). Rounds alternate the VMMs;
//! medians over rounds are compared.

mod disk;
mod net;
mod queues;
mod vm;

use std::path::PathBuf;

use vireo_probe_image::kvm_usable;
use vireo_probe_image::qemu::find_qemu;

use disk::{Case, Result1, Setup, CASES};
use net::{NetResult, QemuNet, VireoNet};
use vm::Vm;

const AFTER_HELP: &str = "\
Disk: each VM boots once per round and image and runs, for --seconds each,
  DISK 0 BENCH randread|randwrite 4K at QD 1 and 32, and read|write 1M at QD 4
(docs/probe-protocol.md). Latencies are measured in the guest from its TSC. QEMU runs each
(aio, cache) in {io_uring, threads} x {none, writeback} with -object iothread and
virtio-blk-device,iothread=...; per case its best median IOPS (and best p99) is compared.
The 1 MiB cases are also compared with the host's memcpy of 1 MiB blocks (the ceiling).
Before every boot the image is written back, dropped from the page cache and read once, so
each VMM starts from the same cache state (not from what the previous VM's writes left).
ex/io and ex/fr: the guest's notifications per request or frame (each one a VM exit, ~25 us
under KVM-PVM), counted by the probe; the device's interrupts are not used by the probe.
The medians of each column are taken independently over the rounds.
Net: probe A sends 64 B and 1500 B frames for --seconds (NET 0 BLAST) to probe B (NET 0 SINK),
which counts frames/s, loss and reordering. Backpressure, the same for both VMMs: B acks every
16 frames back through the switch/bridge and A keeps at most 64 (B's receive ring) unacked, so
fr/s is the delivered rate; `lost` should stay 0, `to` counts windows A re-opened after 200 ms
without an ack. Needs root (TAPs, bridge), /dev/kvm, qemu-img.
Last line: disk_iops_vs_qemu=<min over 4 KiB cases> disk_p99_vs_qemu=<max p99 ratio at QD 1>
  seq_vs_ceiling=<min over 1 MiB cases> net_pps_vs_qemu=<min over frame sizes>";

#[derive(clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct GuestioArgs {
    /// Alternating rounds (medians are taken over them).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: u32,
    /// Seconds per disk case and per frame blast.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=60))]
    seconds: u32,
    /// Size of the image files in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(16..=16384))]
    disk_mib: u64,
    /// Skip the disk half.
    #[arg(long)]
    no_disk: bool,
    /// Only these QEMU modes, as AIO/CACHE (e.g. `io_uring/writeback`); repeatable
    /// [default: all four of io_uring|threads × none|writeback].
    #[arg(long = "qemu-mode", value_name = "AIO/CACHE")]
    pub qemu_modes: Vec<String>,
    /// Only the disk cases whose name contains this (e.g. `QD32`, `1M write`); repeatable
    /// [default: all six].
    #[arg(long = "case", value_name = "NAME")]
    cases: Vec<String>,
    /// Skip the network half.
    #[arg(long)]
    no_net: bool,
    /// The `vireo` binary [default: `vireo` next to this executable].
    #[arg(long, value_name = "PATH")]
    vireo: Option<PathBuf>,
    /// The QEMU binary [default: qemu-system-x86_64 from PATH].
    #[arg(long, value_name = "PATH")]
    qemu: Option<PathBuf>,
    /// Instead of the comparison with QEMU: Vireo alone, its disk with each of these request
    /// queue counts (e.g. `--queues 1,2`), 4 KiB random I/O at QD 32 spread over the queues.
    #[arg(long, value_name = "N,N..", value_delimiter = ',',
          value_parser = clap::value_parser!(u16).range(1..=4))]
    queues: Vec<u16>,
}

pub(crate) const MEMORY_MIB: u32 = 256;
const FRAME_SIZES: [u32; 2] = [64, 1500];

pub fn run(args: GuestioArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !kvm_usable() {
        return Err("/dev/kvm is missing or not readable and writable by this user".into());
    }
    let qemu = match args.qemu.clone().or_else(find_qemu) {
        Some(q) if q.is_file() => q,
        _ => return Err("qemu-system-x86_64 not found (pass --qemu PATH)".into()),
    };
    let vireo = crate::boot::locate_vireo(args.vireo.clone())?;
    let dir = tempfile::Builder::new()
        .prefix("vireo-guestio")
        .tempdir_in("/var/tmp")?;
    if !args.queues.is_empty() {
        println!(
            "guestio --queues: probe guest, 1 vCPU, {MEMORY_MIB} MiB, {} round(s), {} s per case",
            args.rounds, args.seconds
        );
        return Ok(queues::run(queues::QueuesArgs {
            vireo: &vireo,
            dir: dir.path(),
            disk_mib: args.disk_mib,
            rounds: args.rounds,
            seconds: args.seconds,
            counts: &args.queues,
        })?);
    }
    println!(
        "guestio: probe guest, {MEMORY_MIB} MiB, {} round(s), {} s per case",
        args.rounds, args.seconds
    );

    let mut disk_rows = Vec::new();
    let mut seq_ceiling = f64::NAN;
    if !args.no_disk {
        let cases: Vec<&Case> = CASES
            .iter()
            .filter(|c| {
                args.cases.is_empty() || args.cases.iter().any(|n| c.name.contains(n.as_str()))
            })
            .collect();
        if cases.is_empty() {
            return Err(format!(
                "--case {:?} matches no disk case; names are: {}",
                args.cases,
                CASES.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
            )
            .into());
        }
        let images = disk::make_images(dir.path(), args.disk_mib)?;
        let setups = Setup::all();
        let setups: Vec<Setup> = setups
            .into_iter()
            .filter(|s| match s {
                Setup::Vireo => true,
                Setup::Qemu { aio, cache } => {
                    args.qemu_modes.is_empty()
                        || args
                            .qemu_modes
                            .iter()
                            .any(|m| *m == format!("{aio}/{cache}"))
                }
            })
            .collect();
        if setups.len() < 2 {
            return Err(format!(
                "--qemu-mode {:?} matches no QEMU mode; use io_uring|threads / none|writeback",
                args.qemu_modes
            )
            .into());
        }
        // results[image][setup][case] = one value per round.
        let mut results =
            vec![vec![vec![Vec::<Result1>::new(); cases.len()]; setups.len()]; images.len()];
        for round in 0..args.rounds {
            for (ii, image) in images.iter().enumerate() {
                for (si, setup) in setups.iter().enumerate() {
                    disk::same_cache_state(&image.path)?;
                    let vm = match setup {
                        Setup::Vireo => Vm::vireo(
                            &vireo,
                            MEMORY_MIB,
                            &["--disk".into(), image.path.display().to_string()],
                        )?,
                        Setup::Qemu { aio, cache } => {
                            Vm::qemu(&disk::qemu_config(&qemu, MEMORY_MIB, image, aio, cache))?
                        }
                    };
                    let r = disk::run_cases(vm, &cases, args.seconds)
                        .map_err(|e| format!("{} on {}: {e}", setup.label(), image.label))?;
                    eprintln!(
                        "round {}/{} {} {}: {}",
                        round + 1,
                        args.rounds,
                        image.label,
                        setup.label(),
                        r.iter()
                            .map(|x| format!("{:.0}", x.iops))
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                    for (ci, x) in r.into_iter().enumerate() {
                        results[ii][si][ci].push(x);
                    }
                }
            }
        }
        seq_ceiling = disk::memcpy_ceiling_mib_s(args.disk_mib as usize);
        for (ii, image) in images.iter().enumerate() {
            for (ci, case) in cases.iter().enumerate() {
                let med = |si: usize| median_result(&results[ii][si][ci]);
                let v = med(0);
                // QEMU's best mode per case: highest IOPS; its best p99 separately.
                let (best_si, q) = (1..setups.len())
                    .map(|si| (si, med(si)))
                    .max_by(|a, b| a.1.iops.total_cmp(&b.1.iops))
                    .expect("QEMU setups");
                let q_p99 = (1..setups.len())
                    .map(|si| med(si).p99)
                    .fold(f64::INFINITY, f64::min);
                disk_rows.push(DiskRow {
                    image: image.label,
                    case: case.name,
                    small: case.small,
                    qd1: case.qd == 1,
                    vireo: v,
                    qemu: q,
                    qemu_mode: setups[best_si].label(),
                    qemu_p99: q_p99,
                });
            }
        }
    }

    let mut net_rows = Vec::new();
    if !args.no_net {
        let mut v: Vec<Vec<NetResult>> = vec![Vec::new(); FRAME_SIZES.len()];
        let mut q: Vec<Vec<NetResult>> = vec![Vec::new(); FRAME_SIZES.len()];
        for round in 0..args.rounds {
            {
                let mut n = VireoNet::start(&vireo, 64)?;
                let pair = n.pair.as_mut().expect("started");
                for (k, &size) in FRAME_SIZES.iter().enumerate() {
                    let r = pair
                        .measure(size, args.seconds)
                        .map_err(|e| format!("vireo net: {e}"))?;
                    eprintln!("round {} net vireo {size} B: {r:?}", round + 1);
                    v[k].push(r);
                }
            }
            {
                let mut n = QemuNet::start(&qemu, 64)?;
                let pair = n.pair.as_mut().expect("started");
                for (k, &size) in FRAME_SIZES.iter().enumerate() {
                    let r = pair
                        .measure(size, args.seconds)
                        .map_err(|e| format!("qemu net: {e}"))?;
                    eprintln!("round {} net qemu {size} B: {r:?}", round + 1);
                    q[k].push(r);
                }
            }
        }
        for (k, &size) in FRAME_SIZES.iter().enumerate() {
            let m = |rs: &[NetResult], f: fn(&NetResult) -> f64| median(rs.iter().map(f).collect());
            net_rows.push(NetRow {
                size,
                vireo_fps: m(&v[k], |r| r.frames_s),
                qemu_fps: m(&q[k], |r| r.frames_s),
                vireo_loss: m(&v[k], |r| (r.sent - r.frames).max(r.lost)),
                qemu_loss: m(&q[k], |r| (r.sent - r.frames).max(r.lost)),
                vireo_timeouts: m(&v[k], |r| r.timeouts),
                qemu_timeouts: m(&q[k], |r| r.timeouts),
                vireo_kicks: (m(&v[k], |r| r.tx_kicks), m(&v[k], |r| r.rx_kicks)),
                qemu_kicks: (m(&q[k], |r| r.tx_kicks), m(&q[k], |r| r.rx_kicks)),
            });
        }
    }

    print_tables(&disk_rows, seq_ceiling, &net_rows);
    let small = disk_rows.iter().filter(|r| r.small);
    let iops = small
        .clone()
        .map(|r| r.vireo.iops / r.qemu.iops)
        .fold(f64::NAN, f64::min);
    let p99 = disk_rows
        .iter()
        .filter(|r| r.qd1)
        .map(|r| r.vireo.p99 / r.qemu_p99)
        .fold(f64::NAN, f64::max);
    let seq = disk_rows
        .iter()
        .filter(|r| !r.small)
        .map(|r| r.vireo.mib_s / seq_ceiling)
        .fold(f64::NAN, f64::min);
    let pps = net_rows
        .iter()
        .map(|r| r.vireo_fps / r.qemu_fps)
        .fold(f64::NAN, f64::min);
    println!(
        "disk_iops_vs_qemu={iops:.3} disk_p99_vs_qemu={p99:.3} seq_vs_ceiling={seq:.3} net_pps_vs_qemu={pps:.3}"
    );
    Ok(())
}

struct DiskRow {
    image: &'static str,
    case: &'static str,
    small: bool,
    qd1: bool,
    vireo: Result1,
    qemu: Result1,
    qemu_mode: String,
    qemu_p99: f64,
}

struct NetRow {
    size: u32,
    vireo_fps: f64,
    qemu_fps: f64,
    vireo_loss: f64,
    qemu_loss: f64,
    /// Windows re-opened without an ack (blaster timeouts).
    vireo_timeouts: f64,
    qemu_timeouts: f64,
    /// Notifications per frame: (sender tx, sink rx).
    vireo_kicks: (f64, f64),
    qemu_kicks: (f64, f64),
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Field-wise medians over rounds.
pub(crate) fn median_result(rs: &[Result1]) -> Result1 {
    let m = |f: fn(&Result1) -> f64| median(rs.iter().map(f).collect());
    Result1 {
        iops: m(|r| r.iops),
        mib_s: m(|r| r.mib_s),
        p50: m(|r| r.p50),
        p99: m(|r| r.p99),
        p999: m(|r| r.p999),
        kicks_per_io: m(|r| r.kicks_per_io),
    }
}

fn print_tables(disk: &[DiskRow], ceiling: f64, net: &[NetRow]) {
    if !disk.is_empty() {
        println!(
            "{:5} {:18} | {:>9} {:>8} {:>8} {:>9} | {:>9} {:>8} {:>8} {:>9} {:20} | {:>6} {:>6}",
            "image",
            "case",
            "vireo io/s",
            "MiB/s",
            "p50 us",
            "p99 us",
            "qemu io/s",
            "MiB/s",
            "p50 us",
            "p99 us",
            "qemu best mode",
            "iops x",
            "p99 x"
        );
        for r in disk {
            println!(
                "{:5} {:17} | {:>9.0} {:>7.0} {:>7.1} {:>8.1} {:>5.2} | {:>9.0} {:>7.0} {:>7.1} {:>8.1} {:>5.2} {:22} | {:>6.2} {:>6.2}",
                r.image,
                r.case,
                r.vireo.iops,
                r.vireo.mib_s,
                r.vireo.p50,
                r.vireo.p99,
                r.vireo.kicks_per_io,
                r.qemu.iops,
                r.qemu.mib_s,
                r.qemu.p50,
                r.qemu.p99,
                r.qemu.kicks_per_io,
                r.qemu_mode,
                r.vireo.iops / r.qemu.iops,
                r.vireo.p99 / r.qemu_p99,
            );
        }
        println!("memcpy ceiling (host, 1 MiB blocks): {ceiling:.0} MiB/s");
    }
    if !net.is_empty() {
        println!(
            "{:>6} | {:>12} {:>8} {:>5} {:>11} | {:>12} {:>8} {:>5} {:>11} | {:>6}",
            "frame",
            "vireo fr/s",
            "lost",
            "to",
            "ex/fr tx/rx",
            "qemu fr/s",
            "lost",
            "to",
            "ex/fr tx/rx",
            "x"
        );
        for r in net {
            println!(
                "{:>4} B | {:>12.0} {:>8.0} {:>5.0} {:>5.2}/{:>5.2} | {:>12.0} {:>8.0} {:>5.0} {:>5.2}/{:>5.2} | {:>6.2}",
                r.size,
                r.vireo_fps,
                r.vireo_loss,
                r.vireo_timeouts,
                r.vireo_kicks.0,
                r.vireo_kicks.1,
                r.qemu_fps,
                r.qemu_loss,
                r.qemu_timeouts,
                r.qemu_kicks.0,
                r.qemu_kicks.1,
                r.vireo_fps / r.qemu_fps
            );
        }
    }
}
