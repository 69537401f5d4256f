//! What the loader tells the probe: the PVH `hvm_start_info` (command line, memory map) and the
//! virtio-mmio devices listed on the command line. Everything is copied out at start-up, before
//! the probe writes its own status page, since a loader may place these structures anywhere.

use core::ptr::read_volatile;

const START_INFO_MAGIC: u32 = 0x336e_c578;
pub const CMDLINE_MAX: usize = 4096;
pub const MEMMAP_MAX: usize = 128;
pub const MMIO_DEVICES_MAX: usize = 32;
const E820_RAM: u32 = 1;

#[derive(Clone, Copy, Default)]
pub struct RamRegion {
    pub start: u64,
    pub end: u64,
}

#[derive(Clone, Copy, Default)]
pub struct MmioDevice {
    pub base: u64,
}

pub struct BootInfo {
    pub valid_start_info: bool,
    pub cmdline: [u8; CMDLINE_MAX],
    pub cmdline_len: usize,
    pub ram: [RamRegion; MEMMAP_MAX],
    pub ram_count: usize,
    /// True when the loader gave a memory map; without one, memory commands are refused.
    pub has_memmap: bool,
}

#[repr(C)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// The probe identity-maps only the first 4 GiB.
const MAPPED_END: u64 = 1 << 32;

impl BootInfo {
    pub fn read(start_info_gpa: u32) -> Self {
        let mut info = BootInfo {
            valid_start_info: false,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            ram: [RamRegion::default(); MEMMAP_MAX],
            ram_count: 0,
            has_memmap: false,
        };
        let gpa = start_info_gpa as u64;
        if gpa == 0 || gpa > MAPPED_END - core::mem::size_of::<HvmStartInfo>() as u64 {
            return info;
        }
        let si = gpa as *const HvmStartInfo;
        // SAFETY: the address lies in the identity-mapped 4 GiB; reading memory has no side effects.
        let s = unsafe { read_volatile(si) };
        if s.magic != START_INFO_MAGIC {
            return info;
        }
        info.valid_start_info = true;
        if s.cmdline_paddr != 0 && s.cmdline_paddr < MAPPED_END - CMDLINE_MAX as u64 {
            while info.cmdline_len < CMDLINE_MAX - 1 {
                // SAFETY: bounded read inside the identity-mapped 4 GiB.
                let b = unsafe {
                    read_volatile((s.cmdline_paddr + info.cmdline_len as u64) as *const u8)
                };
                if b == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = b;
                info.cmdline_len += 1;
            }
        }
        let entry_size = core::mem::size_of::<MemmapEntry>() as u64;
        let entries = (s.memmap_entries as usize).min(MEMMAP_MAX);
        if s.version >= 1
            && s.memmap_paddr != 0
            && entries > 0
            && s.memmap_paddr + entries as u64 * entry_size <= MAPPED_END
        {
            info.has_memmap = true;
            for i in 0..entries {
                let p = (s.memmap_paddr + i as u64 * entry_size) as *const MemmapEntry;
                // SAFETY: bounded read inside the identity-mapped 4 GiB.
                let e = unsafe { read_volatile(p) };
                if e.kind == E820_RAM && e.size > 0 {
                    info.ram[info.ram_count] = RamRegion {
                        start: e.addr,
                        end: e.addr.saturating_add(e.size),
                    };
                    info.ram_count += 1;
                }
            }
        }
        info
    }

    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    /// RAM size in MiB (sum of RAM regions, rounded up), 0 without a memory map.
    pub fn mem_mib(&self) -> u64 {
        let total: u64 = self.ram[..self.ram_count]
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        total.div_ceil(1 << 20)
    }

    /// True when `start..end` lies inside one RAM region below 4 GiB.
    pub fn is_usable_ram(&self, start: u64, end: u64) -> bool {
        end <= MAPPED_END
            && self.ram[..self.ram_count]
                .iter()
                .any(|r| r.start <= start && end <= r.end)
    }
}

/// Parses `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` entries (Linux syntax; numbers as
/// Linux's memparse: `0x` hex or decimal, optional K/M/G suffix for the size).
pub fn mmio_devices_from_cmdline(
    cmdline: &[u8],
    out: &mut [MmioDevice; MMIO_DEVICES_MAX],
) -> usize {
    let mut n = 0;
    for token in cmdline.split(|b| b.is_ascii_whitespace()) {
        let Some(spec) = token.strip_prefix(b"virtio_mmio.device=") else {
            continue;
        };
        let Some(at) = spec.iter().position(|&b| b == b'@') else {
            continue;
        };
        let (size_txt, rest) = (&spec[..at], &spec[at + 1..]);
        let base_txt = match rest.iter().position(|&b| b == b':') {
            Some(colon) => &rest[..colon],
            None => rest,
        };
        let (Some(size), Some(base)) = (memparse(size_txt), memparse(base_txt)) else {
            continue;
        };
        if n < MMIO_DEVICES_MAX
            && size > 0
            && base.checked_add(size).is_some_and(|e| e <= MAPPED_END)
        {
            out[n] = MmioDevice { base };
            n += 1;
        }
    }
    n
}

/// Linux `memparse`: a number (`0x` hex or decimal) with an optional K/M/G suffix.
pub fn memparse(txt: &[u8]) -> Option<u64> {
    let (digits, shift) = match txt.last()? {
        b'k' | b'K' => (&txt[..txt.len() - 1], 10),
        b'm' | b'M' => (&txt[..txt.len() - 1], 20),
        b'g' | b'G' => (&txt[..txt.len() - 1], 30),
        _ => (txt, 0),
    };
    let value = crate::parse::number(digits)?;
    value.checked_mul(1u64 << shift)
}
