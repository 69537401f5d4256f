//! Region table (MS-VHDX §2.2.3): where the BAT, the metadata region and any extensions live.

use super::*;
use crate::VhdxError;

pub const REGION_TABLE_SIZE: usize = 64 * 1024;
const SIGNATURE: &[u8; 4] = b"regi";
const MAX_ENTRIES: u32 = 2047;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Guid,
    pub file_offset: u64,
    pub length: u32,
    pub required: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionTable {
    pub entries: Vec<RegionEntry>,
}

impl RegionTable {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        b[..4].copy_from_slice(SIGNATURE);
        put32(&mut b, 8, self.entries.len() as u32);
        for (i, e) in self.entries.iter().enumerate() {
            let o = 16 + i * 32;
            b[o..o + 16].copy_from_slice(&e.guid.0);
            put64(&mut b, o + 16, e.file_offset);
            put32(&mut b, o + 24, e.length);
            put32(&mut b, o + 28, e.required as u32);
        }
        let c = checksum(&b, 4);
        put32(&mut b, 4, c);
        b
    }

    /// Parses one region-table copy (signature, checksum, entry count); the error says why not.
    pub fn parse(b: &[u8]) -> Result<RegionTable, String> {
        if b.len() < REGION_TABLE_SIZE {
            return Err("short".into());
        }
        let b = &b[..REGION_TABLE_SIZE];
        if &b[..4] != SIGNATURE {
            return Err(format!("bad signature {:02x?}", &b[..4]));
        }
        if !checksum_ok(b, 4) {
            return Err("checksum mismatch".into());
        }
        let count = le32(b, 8);
        if count > MAX_ENTRIES {
            return Err(format!("entry count {count} exceeds {MAX_ENTRIES}"));
        }
        let entries = (0..count as usize)
            .map(|i| {
                let o = 16 + i * 32;
                RegionEntry {
                    guid: Guid::from_slice(&b[o..]),
                    file_offset: le64(b, o + 16),
                    length: le32(b, o + 24),
                    required: le32(b, o + 28) & 1 != 0,
                }
            })
            .collect();
        Ok(RegionTable { entries })
    }

    pub fn find(&self, guid: Guid) -> Option<&RegionEntry> {
        self.entries.iter().find(|e| e.guid == guid)
    }

    /// Checks alignment, bounds, overlap (with each other, the header section and the log) and
    /// known GUIDs. `file_len` bounds every region.
    pub fn validate(&self, file_len: u64, log: (u64, u64)) -> Result<(), VhdxError> {
        let mut spans: Vec<(u64, u64, Guid)> = vec![];
        for e in &self.entries {
            let bad = |why: String| VhdxError::BadRegion {
                guid: e.guid,
                offset: e.file_offset,
                length: e.length as u64,
                why,
            };
            if e.guid != BAT_REGION && e.guid != METADATA_REGION && e.required {
                return Err(VhdxError::UnknownRequiredRegion(e.guid));
            }
            if e.file_offset % ALIGN != 0 || !(e.length as u64).is_multiple_of(ALIGN) {
                return Err(bad("offset and length must be multiples of 1 MiB".into()));
            }
            if e.file_offset < HEADER_SECTION {
                return Err(bad("overlaps the header section".into()));
            }
            if e.length == 0 {
                return Err(bad("is empty".into()));
            }
            let end = e
                .file_offset
                .checked_add(e.length as u64)
                .ok_or_else(|| bad("overflows".into()))?;
            if end > file_len {
                return Err(bad(format!(
                    "extends past the end of the file ({file_len} bytes)"
                )));
            }
            if e.file_offset < log.0 + log.1 && log.0 < end {
                return Err(bad("overlaps the log".into()));
            }
            if spans.iter().any(|s| s.2 == e.guid) {
                return Err(bad("appears twice".into()));
            }
            if let Some(o) = spans.iter().find(|s| e.file_offset < s.1 && s.0 < end) {
                return Err(bad(format!("overlaps region {}", o.2)));
            }
            spans.push((e.file_offset, end, e.guid));
        }
        if self.find(BAT_REGION).is_none() {
            return Err(VhdxError::MissingRegion("BAT"));
        }
        if self.find(METADATA_REGION).is_none() {
            return Err(VhdxError::MissingRegion("metadata"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RegionTable {
        RegionTable {
            entries: vec![
                RegionEntry {
                    guid: METADATA_REGION,
                    file_offset: 2 * MIB,
                    length: MIB as u32,
                    required: true,
                },
                RegionEntry {
                    guid: BAT_REGION,
                    file_offset: 3 * MIB,
                    length: MIB as u32,
                    required: true,
                },
            ],
        }
    }

    #[test]
    fn roundtrip_and_validation() {
        let t = table();
        let b = t.to_bytes();
        assert_eq!(RegionTable::parse(&b).unwrap(), t);
        t.validate(4 * MIB, (MIB, MIB)).unwrap();
        assert!(matches!(
            t.validate(3 * MIB, (MIB, MIB)),
            Err(VhdxError::BadRegion { .. })
        ));
        let mut overlap = table();
        overlap.entries[1].file_offset = 2 * MIB;
        assert!(matches!(
            overlap.validate(8 * MIB, (MIB, MIB)),
            Err(VhdxError::BadRegion { .. })
        ));
        let mut unknown = table();
        unknown.entries.push(RegionEntry {
            guid: Guid::random(),
            file_offset: 5 * MIB,
            length: MIB as u32,
            required: true,
        });
        assert!(matches!(
            unknown.validate(8 * MIB, (MIB, MIB)),
            Err(VhdxError::UnknownRequiredRegion(_))
        ));
    }
}
