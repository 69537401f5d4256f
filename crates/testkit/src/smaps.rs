//! What a process maps from the hugetlb pool, read from its `/proc/<pid>/smaps`.

/// KiB of hugetlb pool pages that process `pid` (`"self"` for this one) maps from Vireo's
/// guest-RAM file (the `memfd:vireo-guest-ram` mapping); 0 when it has none, or the process
/// is gone.
pub fn guest_ram_hugetlb_kib(pid: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut guest = false;
    let mut kib = 0;
    for line in smaps.lines() {
        // Pages only this process maps count as private, even in a shared mapping.
        let pool_pages = line
            .strip_prefix("Shared_Hugetlb:")
            .or_else(|| line.strip_prefix("Private_Hugetlb:"));
        if let Some(v) = pool_pages {
            if guest {
                kib += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|t| t.contains('-') && !t.ends_with(':'))
        {
            // A mapping's header: "start-end perms offset dev inode [path]".
            guest = line.contains("memfd:vireo-guest-ram");
        }
    }
    kib
}
