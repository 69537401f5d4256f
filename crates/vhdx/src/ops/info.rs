//! `info`: a serialisable description of an open disk.

use std::path::PathBuf;

use crate::format::bat;
use crate::format::locator::ParentLocator;
use crate::guid::Guid;
use crate::{DiskType, Vhdx};

#[derive(Clone, Debug, serde::Serialize)]
pub struct ParentInfo {
    /// Where the parent was found.
    pub path: PathBuf,
    /// The parent DataWriteGuid this disk expects.
    pub linkage: String,
    pub locator: ParentLocator,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Info {
    pub path: PathBuf,
    pub disk_type: DiskType,
    pub virtual_size: u64,
    pub block_size: u32,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub file_size: u64,
    pub total_blocks: u64,
    pub allocated_blocks: u64,
    pub zero_blocks: u64,
    pub chain_depth: usize,
    pub parent: Option<ParentInfo>,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub virtual_disk_id: Guid,
    pub log_offset: u64,
    pub log_length: u64,
    pub log_entries_replayed_at_open: usize,
    pub merge_in_progress: bool,
    pub metadata_items: usize,
    pub creator: String,
}

impl Vhdx {
    pub fn info(&self) -> Info {
        let l = self.top();
        let h = l.header();
        let items = l.state.lock().meta.entries.len();
        let (mut allocated, mut zero) = (0, 0);
        let total = l.geo.payload_blocks(l.vsize());
        {
            let b = l.bat.read();
            for i in 0..total {
                match bat::state(b.entries[l.geo.payload_index(i) as usize]) {
                    bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT => allocated += 1,
                    bat::ZERO | bat::UNMAPPED | bat::UNMAPPED_V095 => zero += 1,
                    _ => {}
                }
            }
        }
        let disk_type = if l.params.has_parent {
            DiskType::Differencing
        } else if l.params.leave_blocks_allocated {
            DiskType::Fixed
        } else {
            DiskType::Dynamic
        };
        let parent = l.params.parent_locator.clone().map(|loc| ParentInfo {
            path: self
                .chain()
                .get(1)
                .map(|p| p.path.clone())
                .unwrap_or_default(),
            linkage: loc.get("parent_linkage").unwrap_or_default().to_string(),
            locator: loc,
        });
        Info {
            path: l.path.clone(),
            disk_type,
            virtual_size: l.vsize(),
            block_size: l.params.block_size,
            logical_sector_size: l.params.logical_sector,
            physical_sector_size: l.params.physical_sector,
            file_size: l.io.len().unwrap_or(0),
            total_blocks: total,
            allocated_blocks: allocated,
            zero_blocks: zero,
            chain_depth: self.chain_depth(),
            parent,
            file_write_guid: h.file_write_guid,
            data_write_guid: h.data_write_guid,
            log_guid: h.log_guid,
            virtual_disk_id: l.params.page83,
            log_offset: h.log_offset,
            log_length: h.log_length as u64,
            log_entries_replayed_at_open: l.replayed_entries,
            merge_in_progress: l.merge_target.is_some(),
            metadata_items: items,
            creator: l.creator.clone(),
        }
    }
}
