//! Metadata region (MS-VHDX §2.6): a table of items plus the items themselves.
//!
//! The whole region is kept as bytes so that unknown (user or future) items survive every
//! rewrite untouched; changes are expressed as byte edits whose 4 KiB pages then go through the log.

use super::locator::ParentLocator;
use super::*;
use crate::VhdxError;

const SIGNATURE: &[u8; 8] = b"metadata";
const MAX_ENTRIES: usize = 2047;
pub const TABLE_SIZE: usize = 64 * 1024;
const MAX_ITEM: u32 = MIB as u32;
/// Refuse metadata regions larger than this instead of allocating for a hostile length.
pub const MAX_REGION: u64 = 64 * MIB;

pub const FLAG_USER: u32 = 1;
pub const FLAG_VIRTUAL_DISK: u32 = 2;
pub const FLAG_REQUIRED: u32 = 4;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataEntry {
    pub item_id: Guid,
    pub offset: u32,
    pub length: u32,
    pub flags: u32,
}

/// The parsed system items every VHDX has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskParams {
    pub block_size: u32,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub page83: Guid,
    pub parent_locator: Option<ParentLocator>,
}

/// The metadata region: raw bytes plus its parsed table.
#[derive(Clone, Debug)]
pub struct Metadata {
    pub region: Vec<u8>,
    pub entries: Vec<MetadataEntry>,
}

const KNOWN: [Guid; 6] = [
    FILE_PARAMETERS,
    VIRTUAL_DISK_SIZE,
    PAGE_83_DATA,
    LOGICAL_SECTOR_SIZE,
    PHYSICAL_SECTOR_SIZE,
    PARENT_LOCATOR,
];

impl Metadata {
    /// Parses the table at the start of `region` and checks every entry's bounds.
    pub fn parse(region: Vec<u8>) -> Result<Metadata, VhdxError> {
        let bad = |s: String| VhdxError::BadMetadataTable(s);
        if region.len() < TABLE_SIZE {
            return Err(bad(format!(
                "region is {} bytes, smaller than the 64 KiB table",
                region.len()
            )));
        }
        if &region[..8] != SIGNATURE {
            return Err(bad(format!("bad signature {:02x?}", &region[..8])));
        }
        let count = le16(&region, 10) as usize;
        if count > MAX_ENTRIES {
            return Err(bad(format!("entry count {count} exceeds {MAX_ENTRIES}")));
        }
        let mut entries: Vec<MetadataEntry> = Vec::with_capacity(count);
        for i in 0..count {
            let o = 32 + i * 32;
            let e = MetadataEntry {
                item_id: Guid::from_slice(&region[o..]),
                offset: le32(&region, o + 16),
                length: le32(&region, o + 20),
                flags: le32(&region, o + 24),
            };
            if e.length > MAX_ITEM {
                return Err(bad(format!(
                    "item {} length {} exceeds 1 MiB",
                    e.item_id, e.length
                )));
            }
            if e.length > 0
                && ((e.offset as usize) < TABLE_SIZE
                    || e.offset as u64 + e.length as u64 > region.len() as u64)
            {
                return Err(bad(format!(
                    "item {} at offset {} length {} is outside the item area",
                    e.item_id, e.offset, e.length
                )));
            }
            if entries
                .iter()
                .any(|x| x.item_id == e.item_id && (x.flags & FLAG_USER) == (e.flags & FLAG_USER))
            {
                return Err(bad(format!("item {} appears twice", e.item_id)));
            }
            if e.flags & FLAG_REQUIRED != 0
                && e.flags & FLAG_USER == 0
                && !KNOWN.contains(&e.item_id)
            {
                return Err(VhdxError::UnknownRequiredMetadata(e.item_id));
            }
            entries.push(e);
        }
        Ok(Metadata { region, entries })
    }

    pub fn item(&self, id: Guid) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|e| e.item_id == id)
            // Empty items may carry any offset (MS-VHDX: offset is 0 when length is 0).
            .map(|e| {
                self.region
                    .get(e.offset as usize..e.offset as usize + e.length as usize)
                    .unwrap_or(&[])
            })
    }

    fn fixed<const N: usize>(&self, id: Guid, name: &'static str) -> Result<[u8; N], VhdxError> {
        let b = self.item(id).ok_or(VhdxError::MissingMetadata(name))?;
        if b.len() < N {
            return Err(VhdxError::BadMetadataValue {
                item: name,
                value: b.len() as u64,
            });
        }
        let mut a = [0u8; N];
        a.copy_from_slice(&b[..N]);
        Ok(a)
    }

    /// Decodes and validates the system items.
    pub fn params(&self) -> Result<DiskParams, VhdxError> {
        let fp: [u8; 8] = self.fixed(FILE_PARAMETERS, "file parameters")?;
        let block_size = le32(&fp, 0);
        let flags = le32(&fp, 4);
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&(block_size as u64))
            || !block_size.is_power_of_two()
        {
            return Err(VhdxError::BadBlockSize(block_size as u64));
        }
        let logical_sector = le32(
            &self.fixed::<4>(LOGICAL_SECTOR_SIZE, "logical sector size")?,
            0,
        );
        if logical_sector != 512 && logical_sector != 4096 {
            return Err(VhdxError::BadSectorSize(logical_sector as u64));
        }
        let physical_sector = le32(
            &self.fixed::<4>(PHYSICAL_SECTOR_SIZE, "physical sector size")?,
            0,
        );
        if physical_sector != 512 && physical_sector != 4096 {
            return Err(VhdxError::BadSectorSize(physical_sector as u64));
        }
        let virtual_size = le64(&self.fixed::<8>(VIRTUAL_DISK_SIZE, "virtual disk size")?, 0);
        if virtual_size == 0
            || virtual_size > MAX_VIRTUAL_SIZE
            || !virtual_size.is_multiple_of(logical_sector as u64)
        {
            return Err(VhdxError::BadVirtualSize(virtual_size));
        }
        let page83 = Guid(self.fixed::<16>(PAGE_83_DATA, "page 83 data")?);
        let has_parent = flags & 2 != 0;
        let parent_locator = if has_parent {
            let raw = self
                .item(PARENT_LOCATOR)
                .ok_or(VhdxError::MissingMetadata("parent locator"))?;
            Some(ParentLocator::parse(raw)?)
        } else {
            None
        };
        Ok(DiskParams {
            block_size,
            leave_blocks_allocated: flags & 1 != 0,
            has_parent,
            virtual_size,
            logical_sector,
            physical_sector,
            page83,
            parent_locator,
        })
    }

    /// Builds a fresh region of `len` bytes holding the given items (offsets assigned in order).
    pub fn build(len: usize, items: &[(Guid, u32, Vec<u8>)]) -> Metadata {
        let mut m = Metadata {
            region: vec![0u8; len],
            entries: vec![],
        };
        m.region[..8].copy_from_slice(SIGNATURE);
        for (id, flags, data) in items {
            m.add_item(*id, *flags, data)
                .expect("fresh region has room");
        }
        m
    }

    fn write_table(&mut self) {
        put16(&mut self.region, 10, self.entries.len() as u16);
        for (i, e) in self.entries.iter().enumerate() {
            let o = 32 + i * 32;
            self.region[o..o + 16].copy_from_slice(&e.item_id.0);
            put32(&mut self.region, o + 16, e.offset);
            put32(&mut self.region, o + 20, e.length);
            put32(&mut self.region, o + 24, e.flags);
            put32(&mut self.region, o + 28, 0);
        }
    }

    /// Adds (or replaces, if the same length) an item; returns the byte range touched.
    pub fn add_item(
        &mut self,
        id: Guid,
        flags: u32,
        data: &[u8],
    ) -> Result<Vec<(usize, usize)>, VhdxError> {
        if let Some(e) = self.entries.iter().find(|e| e.item_id == id).cloned() {
            if e.length as usize == data.len() {
                let o = e.offset as usize;
                self.region[o..o + data.len()].copy_from_slice(data);
                return Ok(vec![(o, o + data.len())]);
            }
            self.remove_item(id);
        }
        if self.entries.len() >= MAX_ENTRIES {
            return Err(VhdxError::MetadataFull(id));
        }
        let free = self
            .entries
            .iter()
            .filter(|e| e.length > 0)
            .map(|e| round_up(e.offset as u64 + e.length as u64, 8) as usize)
            .max()
            .unwrap_or(TABLE_SIZE)
            .max(TABLE_SIZE);
        if free + data.len() > self.region.len() {
            return Err(VhdxError::MetadataFull(id));
        }
        self.region[free..free + data.len()].copy_from_slice(data);
        self.entries.push(MetadataEntry {
            item_id: id,
            offset: if data.is_empty() { 0 } else { free as u32 },
            length: data.len() as u32,
            flags,
        });
        self.write_table();
        Ok(vec![
            (0, 32 + self.entries.len() * 32),
            (free, free + data.len()),
        ])
    }

    /// Drops an item from the table (its bytes stay as unreferenced garbage).
    pub fn remove_item(&mut self, id: Guid) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.item_id != id);
        if self.entries.len() == before {
            return false;
        }
        self.write_table();
        // Clear the now-unused last table slot so the table bytes stay canonical.
        let o = 32 + self.entries.len() * 32;
        self.region[o..o + 32].fill(0);
        true
    }

    /// Overwrites the virtual disk size item in place; returns the byte range touched.
    pub fn set_virtual_size(&mut self, size: u64) -> Result<(usize, usize), VhdxError> {
        let e = self
            .entries
            .iter()
            .find(|e| e.item_id == VIRTUAL_DISK_SIZE)
            .ok_or(VhdxError::MissingMetadata("virtual disk size"))?;
        let o = e.offset as usize;
        put64(&mut self.region, o, size);
        Ok((o, o + 8))
    }
}

/// The standard items of a new disk.
pub fn standard_items(p: &DiskParams) -> Vec<(Guid, u32, Vec<u8>)> {
    let mut fp = vec![0u8; 8];
    put32(&mut fp, 0, p.block_size);
    put32(
        &mut fp,
        4,
        p.leave_blocks_allocated as u32 | (p.has_parent as u32) << 1,
    );
    let vd = FLAG_VIRTUAL_DISK | FLAG_REQUIRED;
    let mut items = vec![
        (FILE_PARAMETERS, FLAG_REQUIRED, fp),
        (VIRTUAL_DISK_SIZE, vd, p.virtual_size.to_le_bytes().to_vec()),
        (PAGE_83_DATA, vd, p.page83.0.to_vec()),
        (
            LOGICAL_SECTOR_SIZE,
            vd,
            p.logical_sector.to_le_bytes().to_vec(),
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            vd,
            p.physical_sector.to_le_bytes().to_vec(),
        ),
    ];
    if let Some(loc) = &p.parent_locator {
        items.push((PARENT_LOCATOR, vd, loc.to_bytes()));
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> DiskParams {
        DiskParams {
            block_size: 32 << 20,
            leave_blocks_allocated: false,
            has_parent: false,
            virtual_size: 1 << 30,
            logical_sector: 512,
            physical_sector: 4096,
            page83: Guid::random(),
            parent_locator: None,
        }
    }

    #[test]
    fn build_parse_roundtrip_preserves_user_items() {
        let p = params();
        let mut m = Metadata::build(MIB as usize, &standard_items(&p));
        m.add_item(Guid::random(), FLAG_USER, b"hello").unwrap();
        let back = Metadata::parse(m.region.clone()).unwrap();
        assert_eq!(back.params().unwrap(), p);
        assert_eq!(back.entries.len(), 6);
        let mut back = back;
        back.set_virtual_size(2 << 30).unwrap();
        assert_eq!(
            Metadata::parse(back.region)
                .unwrap()
                .params()
                .unwrap()
                .virtual_size,
            2 << 30
        );
    }

    #[test]
    fn rejects_bad_values() {
        let mut p = params();
        p.block_size = 3 << 20;
        let m = Metadata::build(MIB as usize, &standard_items(&p));
        assert!(matches!(m.params(), Err(VhdxError::BadBlockSize(_))));
        let mut raw = Metadata::build(MIB as usize, &standard_items(&params())).region;
        put32(&mut raw, 32 + 16, 100); // item offset inside the table area
        assert!(matches!(
            Metadata::parse(raw),
            Err(VhdxError::BadMetadataTable(_))
        ));
        let mut raw = Metadata::build(MIB as usize, &standard_items(&params())).region;
        let mut empty = Metadata::build(MIB as usize, &standard_items(&params()));
        let id = Guid::random();
        empty.add_item(id, FLAG_USER, b"").unwrap();
        let o = 32 + 5 * 32;
        put32(&mut empty.region, o + 16, u32::MAX); // offset of an empty item
        assert_eq!(
            Metadata::parse(empty.region).unwrap().item(id),
            Some(&[][..])
        );
        put32(&mut raw, 32 + 24, FLAG_REQUIRED);
        raw[32] ^= 0xff; // now an unknown required system item
        assert!(matches!(
            Metadata::parse(raw),
            Err(VhdxError::UnknownRequiredMetadata(_))
        ));
    }
}
