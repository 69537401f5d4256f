//! On-disk structures of MS-VHDX: pure parse/serialise functions over byte buffers, no I/O.
//!
//! Every parser takes untrusted bytes and returns a typed error; none allocates more than the
//! structure's fixed maximum.

pub mod bat;
pub mod header;
pub mod locator;
pub mod log;
pub mod metadata;
pub mod region;

use crate::guid::Guid;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
/// Everything in a VHDX file (regions, blocks) is aligned to 1 MiB.
pub const ALIGN: u64 = MIB;
pub const HEADER_SECTION: u64 = MIB;
pub const FILE_ID_OFFSET: u64 = 0;
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
pub const MIN_BLOCK_SIZE: u64 = MIB;
pub const MAX_BLOCK_SIZE: u64 = 256 * MIB;
pub const DEFAULT_BLOCK_SIZE: u32 = 32 * MIB as u32;
/// One sector-bitmap block covers 2^23 logical sectors (MS-VHDX §2.4).
pub const SECTORS_PER_CHUNK: u64 = 1 << 23;
pub const SECTOR_BITMAP_BLOCK: u64 = MIB;

pub const BAT_REGION: Guid = Guid::from_fields(
    0x2dc27766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
pub const METADATA_REGION: Guid = Guid::from_fields(
    0x8b7ca206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);

pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xcaa16737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2fa54224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
pub const PAGE_83_DATA: Guid = Guid::from_fields(
    0xbeca12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xcda348c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xa8d35f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
/// Locator type of a VHDX parent (MS-VHDX §2.6.2.6.3).
pub const VHDX_PARENT_LOCATOR_TYPE: Guid = Guid::from_fields(
    0xb04aefb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);
/// Vireo's own user metadata item: a merge into the parent is in progress. Its value is the
/// DataWriteGuid the parent gets once the merge starts writing (16 bytes).
pub const MERGE_IN_PROGRESS: Guid = Guid::from_fields(
    0x5669_7265,
    0x6f4d,
    0x6572,
    [0x67, 0x65, 0x49, 0x6e, 0x50, 0x72, 0x6f, 0x67],
);

pub fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
pub fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// CRC-32C of `buf` with the 4-byte checksum field at `at` taken as zero.
pub fn checksum(buf: &[u8], at: usize) -> u32 {
    let crc = crc32c::crc32c(&buf[..at]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &buf[at + 4..])
}

pub fn checksum_ok(buf: &[u8], at: usize) -> bool {
    checksum(buf, at) == le32(buf, at)
}

pub fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

/// Encodes a string as UTF-16LE without terminator.
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Decodes UTF-16LE bytes; `None` for odd lengths or unpaired surrogates.
pub fn from_utf16le(b: &[u8]) -> Option<String> {
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).ok()
}
