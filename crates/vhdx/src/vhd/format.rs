//! On-disk structures of VHD v1 (Microsoft "Virtual Hard Disk Image Format Specification" 1.0):
//! the 512-byte footer, the 1024-byte dynamic header and its parent locators. All big-endian.

use super::VhdError;

pub const SECTOR: u64 = 512;
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// Data offset of a fixed disk's footer: "no dynamic header".
pub const NO_OFFSET: u64 = u64::MAX;
/// BAT value of a block that is not allocated.
pub const UNALLOCATED: u32 = u32::MAX;
/// The format's limit (2040 GiB), the largest size CHS geometry and common tools accept.
pub const MAX_SIZE: u64 = 2040 << 30;
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
const VHD_EPOCH: u64 = 946_684_800;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    Fixed = 2,
    Dynamic = 3,
    Differencing = 4,
}

/// The footer every VHD ends with (dynamic ones also start with a copy of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: (u16, u8, u8),
    pub disk_type: DiskType,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// One's complement of the byte sum, with the checksum field itself counted as zero.
pub fn checksum(bytes: &[u8], field: usize) -> u32 {
    let sum = bytes.iter().enumerate().fold(0u32, |acc, (i, &b)| {
        if (field..field + 4).contains(&i) {
            acc
        } else {
            acc.wrapping_add(b as u32)
        }
    });
    !sum
}

impl Footer {
    pub fn parse(b: &[u8; 512]) -> Result<Footer, VhdError> {
        if &b[0..8] != FOOTER_COOKIE {
            return Err(VhdError::NoFooter);
        }
        let stored = be32(b, 64);
        let computed = checksum(b, 64);
        if stored != computed {
            return Err(VhdError::FooterChecksum { stored, computed });
        }
        let version = be32(b, 12);
        if version >> 16 != 1 {
            return Err(VhdError::Version(version));
        }
        let disk_type = match be32(b, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            t => return Err(VhdError::DiskType(t)),
        };
        let current_size = be64(b, 48);
        if !current_size.is_multiple_of(SECTOR) || current_size > MAX_SIZE {
            return Err(VhdError::BadSize(current_size));
        }
        Ok(Footer {
            features: be32(b, 8),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: b[28..32].try_into().unwrap(),
            creator_version: be32(b, 32),
            creator_os: b[36..40].try_into().unwrap(),
            original_size: be64(b, 40),
            current_size,
            geometry: (u16::from_be_bytes([b[56], b[57]]), b[58], b[59]),
            disk_type,
            unique_id: b[68..84].try_into().unwrap(),
            saved_state: b[84],
        })
    }

    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.geometry.0.to_be_bytes());
        b[58] = self.geometry.1;
        b[59] = self.geometry.2;
        b[60..64].copy_from_slice(&(self.disk_type as u32).to_be_bytes());
        b[68..84].copy_from_slice(&self.unique_id);
        b[84] = self.saved_state;
        let sum = checksum(&b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// A new footer for a disk of `size` bytes. The creator is recorded as "win " because
    /// readers (QEMU among them) only trust `current_size` over CHS geometry for creators they
    /// know write exact sizes, and like Hyper-V we do; the version field says Vireo wrote it.
    pub fn new(size: u64, disk_type: DiskType, data_offset: u64) -> Footer {
        Footer {
            features: 2,
            data_offset,
            timestamp: vhd_timestamp(),
            creator_app: *b"win ",
            creator_version: 0x000a_0000,
            creator_os: *b"Wi2k",
            original_size: size,
            current_size: size,
            geometry: chs_geometry(size / SECTOR),
            disk_type,
            unique_id: random_id(),
            saved_state: 0,
        }
    }
}

/// One of the eight parent locator entries of a differencing disk's header.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ParentLocator {
    pub platform_code: [u8; 4],
    pub data_space: u32,
    pub data_length: u32,
    pub data_offset: u64,
}

/// The dynamic disk header ("cxsparse"), following the footer copy in dynamic and
/// differencing disks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicHeader {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: u32,
    /// UTF-16BE in the file, decoded here.
    pub parent_name: String,
    pub locators: Vec<ParentLocator>,
}

impl DynamicHeader {
    pub fn parse(b: &[u8; 1024]) -> Result<DynamicHeader, VhdError> {
        if &b[0..8] != HEADER_COOKIE {
            return Err(VhdError::NoDynamicHeader);
        }
        let stored = be32(b, 36);
        let computed = checksum(b, 36);
        if stored != computed {
            return Err(VhdError::HeaderChecksum { stored, computed });
        }
        let block_size = be32(b, 32);
        if !block_size.is_power_of_two() || !(512..=(256 << 20)).contains(&block_size) {
            return Err(VhdError::BlockSize(block_size));
        }
        let name_units: Vec<u16> = b[64..576]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let locators = (0..8)
            .map(|i| {
                let e = &b[576 + 24 * i..600 + 24 * i];
                ParentLocator {
                    platform_code: e[0..4].try_into().unwrap(),
                    data_space: be32(e, 4),
                    data_length: be32(e, 8),
                    data_offset: be64(e, 16),
                }
            })
            .collect();
        Ok(DynamicHeader {
            table_offset: be64(b, 16),
            max_table_entries: be32(b, 28),
            block_size,
            parent_unique_id: b[40..56].try_into().unwrap(),
            parent_timestamp: be32(b, 56),
            parent_name: String::from_utf16_lossy(&name_units),
            locators,
        })
    }

    pub fn to_bytes(&self) -> [u8; 1024] {
        let mut b = [0u8; 1024];
        b[0..8].copy_from_slice(HEADER_COOKIE);
        b[8..16].copy_from_slice(&NO_OFFSET.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_unique_id);
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        for (i, unit) in self.parent_name.encode_utf16().take(256).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&unit.to_be_bytes());
        }
        for (i, l) in self.locators.iter().take(8).enumerate() {
            let e = &mut b[576 + 24 * i..600 + 24 * i];
            e[0..4].copy_from_slice(&l.platform_code);
            e[4..8].copy_from_slice(&l.data_space.to_be_bytes());
            e[8..12].copy_from_slice(&l.data_length.to_be_bytes());
            e[16..24].copy_from_slice(&l.data_offset.to_be_bytes());
        }
        let sum = checksum(&b, 36);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }
}

/// CHS geometry for `sectors` as the VHD specification's appendix computes it.
pub fn chs_geometry(sectors: u64) -> (u16, u8, u8) {
    let total = sectors.min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

fn vhd_timestamp() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH);
    now.saturating_sub(VHD_EPOCH) as u32
}

/// A random version-4 UUID's bytes; identity only, so std's randomly keyed hasher is enough.
fn random_id() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut id = [0u8; 16];
    for (i, half) in id.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

pub fn format_id(id: &[u8; 16]) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_round_trips_and_detects_corruption() {
        let f = Footer::new(100 << 20, DiskType::Dynamic, 512);
        let mut b = f.to_bytes();
        assert_eq!(Footer::parse(&b).unwrap(), f);
        b[100] ^= 1;
        assert!(matches!(
            Footer::parse(&b),
            Err(VhdError::FooterChecksum { .. })
        ));
    }

    #[test]
    fn header_round_trips() {
        let h = DynamicHeader {
            table_offset: 1536,
            max_table_entries: 50,
            block_size: 2 << 20,
            parent_unique_id: [7; 16],
            parent_timestamp: 5,
            parent_name: "base.vhd".into(),
            locators: vec![ParentLocator::default(); 8],
        };
        assert_eq!(DynamicHeader::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn geometry_matches_the_specification_examples() {
        // 100 MiB as qemu-img rounds it: 203200 sectors = 1016 x 16 x ... (qemu agrees).
        assert_eq!(chs_geometry(204_816), (1004, 12, 17));
        assert_eq!(chs_geometry(u64::MAX), (65535, 16, 255));
    }
}
