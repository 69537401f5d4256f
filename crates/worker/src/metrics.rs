//! The worker's side of resource metering (`metrics` on worker.sock): per-disk counters from the
//! virtio-blk devices, CPU time from `/proc/self/stat` and `/proc/self/task/*/stat`, memory
//! from `/proc/self/smaps`. Everything is read when asked; nothing runs in the background, and
//! the counters only grow (vireod subtracts two readings for a billing period).
//!
//! The parsers are pure functions over the files' text, tested on samples.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use vireo_api::worker::{DiskMetrics, WorkerMetrics};
use vireo_virtio::block::BlockCounters;

/// What names the guest-RAM mapping in smaps: vireo-vmm's huge-page file (the default,
/// `memory/huge_tmpfs.rs`), shown as `/vireo-guest-ram (deleted)`, or its memfd (`memory.rs`,
/// `memfd_create("vireo-guest-ram")`, also on the hugetlb pool), shown as
/// `/memfd:vireo-guest-ram (deleted)`.
pub const GUEST_RAM_MAPPING: &str = "vireo-guest-ram (deleted)";

/// `AT_CLKTCK` in the auxiliary vector: the unit of the CPU times in `/proc/*/stat`.
const AT_CLKTCK: u64 = 17;
/// What Linux reports on every architecture Vireo runs on, if the auxv cannot be read.
const DEFAULT_CLK_TCK: u64 = 100;

/// One disk as the meter sees it.
pub struct MeteredDisk {
    pub path: PathBuf,
    pub serial: Option<String>,
    pub counters: Arc<BlockCounters>,
}

/// What `metrics` reads from.
pub struct Meter {
    /// In slot order (the spec's order); hot add and remove change it (`hotplug.rs`).
    pub disks: std::sync::Mutex<Vec<MeteredDisk>>,
    pub memory_bytes: u64,
    /// When the vCPUs started.
    pub started: OnceLock<Instant>,
}

impl Meter {
    pub fn new(disks: Vec<MeteredDisk>, memory_bytes: u64) -> Self {
        Meter {
            disks: std::sync::Mutex::new(disks),
            memory_bytes,
            started: OnceLock::new(),
        }
    }

    /// A reading now. A /proc file that cannot be read counts as zero (and is logged at
    /// debug): metering must not fail the worker.
    pub fn read(&self) -> WorkerMetrics {
        let tick_ns = 1_000_000_000 / clock_ticks_per_sec();
        let (resident, private) = read_proc("/proc/self/smaps")
            .map(|t| memory_from_smaps(&t))
            .unwrap_or_default();
        // The vCPU threads first, the whole process second: the threads keep running between
        // the two reads, and each thread's time is rounded to ticks on its own, so read the
        // other way round their sum could pass the process's total. vCPU time is part of the
        // process's time, so a reading never says otherwise.
        let vcpu_ticks = vcpu_ticks();
        let worker_ticks = read_proc("/proc/self/stat")
            .and_then(|t| cpu_ticks(&t).map(|(_, ticks)| ticks))
            .unwrap_or(0);
        let vcpu_ticks = vcpu_ticks.min(worker_ticks);
        WorkerMetrics {
            uptime_ns: self.started.get().map_or(0, |t| {
                u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
            }),
            vcpu_cpu_ns: vcpu_ticks.saturating_mul(tick_ns),
            worker_cpu_ns: worker_ticks.saturating_mul(tick_ns),
            memory_bytes: self.memory_bytes,
            memory_resident_bytes: resident,
            worker_private_bytes: private,
            disks: self
                .disks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(disk_metrics)
                .collect(),
        }
    }
}

fn disk_metrics(d: &MeteredDisk) -> DiskMetrics {
    let s = d.counters.snapshot();
    DiskMetrics {
        path: d.path.clone(),
        serial: d.serial.clone(),
        read_bytes: s.read_bytes,
        write_bytes: s.write_bytes,
        read_ops: s.reads,
        write_ops: s.writes,
        flush_ops: s.flushes,
        normalized_ios: s.normalized_ios,
        throttled_ns: s.throttled_ns,
        min_iops_alerts: s.min_iops_alerts,
        min_iops_alert_active: s.min_iops_alert_active,
    }
}

fn read_proc(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .map_err(|e| tracing::debug!("metrics: cannot read {path}: {e}"))
        .ok()
}

/// Clock ticks per second of `/proc` CPU times, from the auxiliary vector (what
/// `sysconf(_SC_CLK_TCK)` returns), read once.
pub fn clock_ticks_per_sec() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::fs::read("/proc/self/auxv")
            .ok()
            .and_then(|b| auxv_value(&b, AT_CLKTCK))
            .filter(|&t| t > 0)
            .unwrap_or(DEFAULT_CLK_TCK)
    })
}

/// The value of `key` in an auxiliary vector (native-endian pairs of u64 words).
fn auxv_value(auxv: &[u8], key: u64) -> Option<u64> {
    auxv.chunks_exact(16).find_map(|pair| {
        let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or_default());
        (word(&pair[..8]) == key).then(|| word(&pair[8..]))
    })
}

/// `(comm, utime + stime)` of a `stat` line. The command name sits in parentheses and may
/// itself contain spaces and parentheses, so the fields are counted from the last `)`.
pub fn cpu_ticks(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    // After ")": field 3 (state) first; utime and stime are fields 14 and 15.
    let mut fields = stat.get(close + 1..)?.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((comm, utime + stime))
}

/// Whether a thread name is a vCPU's (vireo-vmm names them `vcpu<index>`).
fn is_vcpu(comm: &str) -> bool {
    comm.strip_prefix("vcpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Clock ticks the vCPU threads have run (user + system).
fn vcpu_ticks() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|s| cpu_ticks(&s).filter(|(c, _)| is_vcpu(c)).map(|(_, t)| t))
        .sum()
}

/// From smaps text: (resident bytes of the guest-RAM mapping(s), private bytes of every other
/// mapping). Private is `Private_Clean + Private_Dirty`: pages only this process maps, what
/// it costs the host beyond the shared binary and guest RAM.
pub fn memory_from_smaps(smaps: &str) -> (u64, u64) {
    let mut guest = false;
    let (mut resident, mut private) = (0, 0);
    for line in smaps.lines() {
        let Some((key, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        if let Some(field) = key.strip_suffix(':') {
            let kib: u64 = rest
                .split_ascii_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            match field {
                // Pool pages are not in Rss; smaps counts them apart.
                "Rss" | "Shared_Hugetlb" | "Private_Hugetlb" if guest => resident += kib * 1024,
                "Private_Clean" | "Private_Dirty" if !guest => private += kib * 1024,
                _ => {}
            }
        } else if key.contains('-') {
            // A mapping's header: "start-end perms offset dev inode [path]".
            guest = rest.contains(GUEST_RAM_MAPPING);
        }
    }
    (resident, private)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_awkward_names() {
        let line = "4242 (vcpu0) S 1 2 3 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 9 0 123 0 0";
        assert_eq!(cpu_ticks(line), Some(("vcpu0", 281)));
        let odd = "7 (a) (b c) R 1 2 3 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 0 0";
        assert_eq!(cpu_ticks(odd), Some(("a) (b c", 11)));
        assert_eq!(cpu_ticks("7 (x) R 1"), None);
        assert_eq!(cpu_ticks("garbage"), None);
        assert!(is_vcpu("vcpu0") && is_vcpu("vcpu31"));
        assert!(!is_vcpu("vcpu") && !is_vcpu("vcpu-x") && !is_vcpu("virtio-blk"));
    }

    #[test]
    fn smaps_splits_guest_ram_from_the_workers_own() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/vireo-vm
Rss:                1024 kB
Private_Clean:        12 kB
Private_Dirty:         0 kB
7f0000000000-7f0010000000 rw-s 00000000 00:01 99 /memfd:vireo-guest-ram (deleted)
Rss:                8192 kB
Private_Clean:         0 kB
Private_Dirty:      8192 kB
VmFlags: rd wr sh mr mw me ms sd
7f0020000000-7f0020021000 rw-p 00000000 00:00 0
Rss:                 132 kB
Private_Dirty:       132 kB
7f0030000000-7f0030001000 rw-s 00000000 00:01 99 /memfd:vireo-guest-ram (deleted)
Rss:                   4 kB
7f0040000000-7f0040400000 rw-s 00000000 00:2f 3 /vireo-guest-ram (deleted)
Rss:                2048 kB
Private_Dirty:      2048 kB
7f0060000000-7f0061000000 rw-s 00000000 00:10 7 /memfd:vireo-guest-ram (deleted)
Rss:                   0 kB
Shared_Hugetlb:     4096 kB
Private_Hugetlb:       0 kB
";
        // The last mapping is guest RAM on the hugetlb pool: its pages show only as Hugetlb.
        assert_eq!(
            memory_from_smaps(smaps),
            ((10244 + 4096) * 1024, (12 + 132) * 1024)
        );
        assert_eq!(memory_from_smaps(""), (0, 0));
    }

    #[test]
    fn auxv_lookup() {
        let mut v = Vec::new();
        for (k, val) in [(6u64, 4096u64), (17, 100), (0, 0)] {
            v.extend_from_slice(&k.to_ne_bytes());
            v.extend_from_slice(&val.to_ne_bytes());
        }
        assert_eq!(auxv_value(&v, 17), Some(100));
        assert_eq!(auxv_value(&v, 33), None);
        assert_eq!(auxv_value(&v[..20], 17), None);
        assert!(clock_ticks_per_sec() > 0);
    }
}
