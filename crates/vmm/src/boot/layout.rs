//! Where boot structures live in low guest memory, and the e820 / PVH memory map.
//!
//! Everything the VMM writes for boot sits below 0x80000 (the probe's status page) and below the
//! kernel at 1 MiB, so no kernel or initrd can overlap it.

use crate::memory::{ram_ranges, MMIO_HOLE_END, MMIO_HOLE_START};

/// 64-bit boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Empty IDT used for 64-bit entry (the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH memory map table, right after the start info.
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// Maximum PVH memory map entries (fits between the info and the zero page).
pub const PVH_MEMMAP_MAX: usize = 64;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Identity-mapping page tables for 64-bit entry: PML4, PDPT, then one PD per GiB mapped.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Number of GiB identity-mapped for 64-bit entry (PDs at PD_ADDR.. one page each).
pub const IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line (bytes, NUL included).
pub const CMDLINE_MAX: usize = 0x10000;
/// End of usable low RAM (the EBDA conventionally starts here).
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels load here (and at least here).
pub const HIMEM_START: u64 = 0x10_0000;

/// e820 types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's memory map for `ram_size` bytes of RAM: low RAM below the EBDA, the legacy
/// 640K–1M area reserved, RAM from 1 MiB up to the MMIO hole, the hole reserved, RAM above 4 GiB.
pub fn memory_map(ram_size: u64) -> Vec<MemEntry> {
    let mut map = vec![
        MemEntry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MemEntry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_ranges(ram_size) {
        let start_hi = start.max(HIMEM_START);
        let end = start + len;
        if end > start_hi {
            map.push(MemEntry {
                addr: start_hi,
                size: end - start_hi,
                kind: E820_RAM,
            });
        }
        if end == MMIO_HOLE_START {
            map.push(MemEntry {
                addr: MMIO_HOLE_START,
                size: MMIO_HOLE_END - MMIO_HOLE_START,
                kind: E820_RESERVED,
            });
        }
    }
    map
}

/// Highest end address of RAM below 4 GiB.
pub fn low_ram_end(ram_size: u64) -> u64 {
    ram_size.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.0 + b.1 && b.0 < a.0 + a.1
    }

    #[test]
    fn map_for_small_guest() {
        let map = memory_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr, HIMEM_START);
        assert_eq!(map[2].addr + map[2].size, 256 << 20);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (256 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn map_for_large_guest_reserves_hole_and_continues_above_4g() {
        let map = memory_map(6 << 30);
        let hole = map.iter().find(|e| e.addr == MMIO_HOLE_START).unwrap();
        assert_eq!(hole.kind, E820_RESERVED);
        let last = map.last().unwrap();
        assert_eq!(
            (last.addr, last.size, last.kind),
            (4 << 30, 3 << 30, E820_RAM)
        );
        for w in map.windows(2) {
            assert!(
                w[0].addr + w[0].size <= w[1].addr,
                "sorted, disjoint: {map:?}"
            );
        }
    }

    #[test]
    fn boot_structures_do_not_overlap_each_other_or_the_kernel() {
        let items = [
            (GDT_ADDR, 0x20),
            (IDT_ADDR, 8),
            (PVH_INFO_ADDR, 0x40),
            (PVH_MEMMAP_ADDR, (PVH_MEMMAP_MAX * 24) as u64),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, 0x1000 * IDENTITY_MAP_GIB),
            (CMDLINE_ADDR, CMDLINE_MAX as u64),
        ];
        for (i, a) in items.iter().enumerate() {
            assert!(a.0 + a.1 <= 0x80000, "below the probe status page: {a:x?}");
            for b in &items[i + 1..] {
                assert!(!overlaps(*a, *b), "{a:x?} overlaps {b:x?}");
            }
        }
    }
}
