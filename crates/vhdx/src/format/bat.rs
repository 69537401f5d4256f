//! Block allocation table entries and the geometry that maps virtual offsets to them
//! (MS-VHDX §2.5): payload entries interleaved with one sector-bitmap entry per chunk.

use super::*;

pub const NOT_PRESENT: u8 = 0;
pub const UNDEFINED: u8 = 1;
pub const ZERO: u8 = 2;
pub const UNMAPPED: u8 = 3;
/// Value used for UNMAPPED by the v0.95 draft (QEMU still accepts it).
pub const UNMAPPED_V095: u8 = 5;
pub const FULLY_PRESENT: u8 = 6;
pub const PARTIALLY_PRESENT: u8 = 7;
pub const SB_NOT_PRESENT: u8 = 0;
pub const SB_PRESENT: u8 = 6;

pub fn state(e: u64) -> u8 {
    (e & 7) as u8
}
pub fn offset(e: u64) -> u64 {
    (e >> 20) << 20
}
pub fn entry(state: u8, offset: u64) -> u64 {
    debug_assert_eq!(offset % MIB, 0);
    offset | state as u64
}

pub fn state_name(s: u8) -> &'static str {
    match s {
        NOT_PRESENT => "not present",
        UNDEFINED => "undefined",
        ZERO => "zero",
        UNMAPPED | UNMAPPED_V095 => "unmapped",
        FULLY_PRESENT => "fully present",
        PARTIALLY_PRESENT => "partially present",
        _ => "reserved",
    }
}

/// Derived sizes of one disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    pub logical_sector: u64,
    pub chunk_ratio: u64,
    pub differencing: bool,
}

impl Geometry {
    pub fn new(block_size: u32, logical_sector: u32, differencing: bool) -> Geometry {
        Geometry {
            block_size: block_size as u64,
            logical_sector: logical_sector as u64,
            chunk_ratio: (SECTORS_PER_CHUNK * logical_sector as u64) / block_size as u64,
            differencing,
        }
    }

    pub fn payload_blocks(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(self.block_size)
    }

    /// Number of BAT entries a disk of `virtual_size` needs (MS-VHDX §2.5).
    pub fn bat_entries(&self, virtual_size: u64) -> u64 {
        let blocks = self.payload_blocks(virtual_size);
        if self.differencing {
            blocks.div_ceil(self.chunk_ratio) * (self.chunk_ratio + 1)
        } else {
            blocks + blocks.saturating_sub(1) / self.chunk_ratio
        }
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector-bitmap entry of the chunk holding payload block `block`.
    pub fn bitmap_index(&self, block: u64) -> u64 {
        (block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// True when BAT index `i` is a sector-bitmap entry.
    pub fn is_bitmap_index(&self, i: u64) -> bool {
        i % (self.chunk_ratio + 1) == self.chunk_ratio
    }

    /// Payload block number of BAT index `i` (which must not be a bitmap index).
    pub fn block_of_index(&self, i: u64) -> u64 {
        i - i / (self.chunk_ratio + 1)
    }

    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.logical_sector
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ratio_and_indices() {
        let g = Geometry::new(32 << 20, 512, false);
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.payload_index(127), 127);
        assert_eq!(g.payload_index(128), 129);
        assert_eq!(g.bitmap_index(5), 128);
        assert!(g.is_bitmap_index(128));
        assert_eq!(g.block_of_index(129), 128);
        assert_eq!(g.bat_entries(128 * (32 << 20)), 128);
        assert_eq!(g.bat_entries(129 * (32 << 20)), 130);
        let d = Geometry::new(1 << 20, 4096, true);
        assert_eq!(d.chunk_ratio, 32768);
        assert_eq!(d.bat_entries(1 << 20), 32769);
        let e = entry(FULLY_PRESENT, 5 * MIB);
        assert_eq!((state(e), offset(e)), (FULLY_PRESENT, 5 * MIB));
    }
}
