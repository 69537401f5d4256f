//! `guestio --queues`: one request queue against several (VIRTIO_BLK_F_MQ) under `vireo run`
//! alone. The probe keeps the same queue depth in flight and spreads it over the disk's
//! queues (`DISK 0 BENCH ... queues=N`); rounds alternate the queue counts on the same image
//! files, and medians over rounds are compared. No QEMU: the question is what a second worker
//! thread buys this host, not how a peer does.

use std::time::Duration;

use super::disk::{make_images, Result1};
use super::vm::{field, Vm};
use super::{median_result, MEMORY_MIB};

/// (name, op, bs, qd): the cases where a second queue can matter.
const CASES: &[(&str, &str, &str, u32)] = &[
    ("4K randread QD32", "randread", "4K", 32),
    ("4K randwrite QD32", "randwrite", "4K", 32),
];

pub struct QueuesArgs<'a> {
    pub vireo: &'a std::path::Path,
    pub dir: &'a std::path::Path,
    pub disk_mib: u64,
    pub rounds: u32,
    pub seconds: u32,
    /// The queue counts compared, e.g. [1, 2].
    pub counts: &'a [u16],
}

pub fn run(a: QueuesArgs<'_>) -> Result<(), String> {
    let images = make_images(a.dir, a.disk_mib)?;
    // results[image][count][case], one value per round.
    let mut results =
        vec![vec![vec![Vec::<Result1>::new(); CASES.len()]; a.counts.len()]; images.len()];
    let mut loads = Vec::new();
    for round in 0..a.rounds {
        for (ii, image) in images.iter().enumerate() {
            for (ni, &n) in a.counts.iter().enumerate() {
                // One vCPU whatever the queue count: the probe's APs spin, and a spinning vCPU
                // would take the core the second worker is meant to use.
                let disk = format!("{},queues={n}", image.path.display());
                let mut vm = Vm::vireo(a.vireo, MEMORY_MIB, &["--disk".into(), disk])?;
                vm.command("TSC", Duration::from_secs(10))?;
                for (ci, &(name, op, bs, qd)) in CASES.iter().enumerate() {
                    let cmd = format!("DISK 0 BENCH {op} {bs} {qd} {} queues={n}", a.seconds);
                    let ans = vm.command(&cmd, Duration::from_secs(u64::from(a.seconds) + 60))?;
                    let r = Result1 {
                        iops: field(&ans, "iops")?,
                        mib_s: field(&ans, "mib_s")?,
                        p50: field(&ans, "p50_us")?,
                        p99: field(&ans, "p99_us")?,
                        p999: field(&ans, "p999_us")?,
                        kicks_per_io: field(&ans, "kicks")? / field(&ans, "ios")?.max(1.0),
                    };
                    eprintln!(
                        "round {}/{} {} queues={n} {name}: {:.0} IOPS p99 {:.0} us",
                        round + 1,
                        a.rounds,
                        image.label,
                        r.iops,
                        r.p99
                    );
                    results[ii][ni][ci].push(r);
                }
            }
        }
        loads.push(load_average());
    }
    println!(
        "{:5} {:18} {:>6} | {:>9} {:>8} {:>8} {:>6}",
        "image", "case", "queues", "IOPS", "p50 us", "p99 us", "ex/io"
    );
    for (ii, image) in images.iter().enumerate() {
        for (ci, &(name, ..)) in CASES.iter().enumerate() {
            let base = median_result(&results[ii][0][ci]).iops;
            for (ni, &n) in a.counts.iter().enumerate() {
                let m = median_result(&results[ii][ni][ci]);
                println!(
                    "{:5} {:18} {:>6} | {:>9.0} {:>8.1} {:>8.1} {:>6.3}   x{:.2}",
                    image.label,
                    name,
                    n,
                    m.iops,
                    m.p50,
                    m.p99,
                    m.kicks_per_io,
                    m.iops / base
                );
            }
        }
    }
    println!(
        "host load average (1 min) after each round: {}",
        loads
            .iter()
            .map(|l| format!("{l:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

/// The 1-minute load average, NaN if /proc is not readable: figures on a loaded host are only
/// comparable with it beside them.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}
