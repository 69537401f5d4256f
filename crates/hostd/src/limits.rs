//! This host's limits for a VM spec: vCPUs up to the host's CPUs, memory up to its RAM. The
//! store refuses more (HTTP 422); overcommit across VMs is the scheduler's concern, not this.

use std::path::Path;

use vireo_api::Limits;

use crate::store::DEFAULT_LIMITS;

/// The limits of the machine we run on; falls back to `DEFAULT_LIMITS` for what it cannot read.
pub fn host_limits() -> Limits {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32);
    let mem = std::fs::read_to_string(Path::new("/proc/meminfo"))
        .ok()
        .and_then(|s| mem_total(&s));
    Limits {
        max_vcpus: cpus.unwrap_or(DEFAULT_LIMITS.max_vcpus),
        max_memory_bytes: mem.unwrap_or(DEFAULT_LIMITS.max_memory_bytes),
    }
}

/// `MemTotal:  16318860 kB` → bytes, rounded down to 4 KiB.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.checked_mul(1024)? & !4095)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo() {
        assert_eq!(
            mem_total("MemFree: 1 kB\nMemTotal:  16318861 kB\n"),
            Some((16318861 * 1024) & !4095)
        );
        assert_eq!(mem_total("MemTotal: lots kB\n"), None);
        assert_eq!(mem_total(""), None);
        let host = host_limits();
        assert!(
            host.max_vcpus >= 1 && host.max_memory_bytes >= 1 << 20,
            "{host:?}"
        );
    }
}
