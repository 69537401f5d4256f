//! `check`: our own consistency checker, independent of the open path so it can describe files
//! that would not open, and repair what MS-VHDX allows (header and region-table copies, log
//! replay, BAT entries that cannot be valid).

use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Path, PathBuf};

use crate::fileio::FileIo;
use crate::format::bat;
use crate::format::header::Header;
use crate::format::log::Change;
use crate::format::*;
use crate::guid::Guid;
use crate::layer::{
    bat_problems, read_active_log, read_prelude, read_tables, reserved_spans, validate_log,
    write_header, Tables,
};
use crate::{LockKind, OpenOptions, Vhdx, VhdxError};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Problem {
    /// "error" (the file is inconsistent) or "warning" (valid but worth knowing).
    pub severity: &'static str,
    pub message: String,
    pub repaired: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CheckReport {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
    /// Entries in the active log sequence found (and replayed if repairing).
    pub log_entries: usize,
    pub allocated_blocks: u64,
    pub file_size: u64,
    /// True when no unrepaired error remains.
    pub clean: bool,
}

const MAX_REPORTED: usize = 1000;

impl Vhdx {
    /// Checks `path`; with `repair`, fixes what can be fixed without guessing at data.
    /// Without `repair` the file is opened read-only and never written. Locks like an open:
    /// shared, or exclusive with `repair` ([`VhdxError::Locked`] when that conflicts).
    pub fn check(path: &Path, repair: bool) -> Result<CheckReport, VhdxError> {
        let file = FsOpenOptions::new().read(true).write(repair).open(path)?;
        let kind = if repair {
            LockKind::Exclusive
        } else {
            LockKind::Shared
        };
        vireo_block::lock(&file, path, kind)?;
        let io = FileIo::new(file, None);
        let mut problems = vec![];
        let mut add = |severity, message: String, repaired| {
            problems.push(Problem {
                severity,
                message,
                repaired,
            })
        };
        let mut pre = read_prelude(&io)?;
        for (i, h) in pre.headers.iter().enumerate() {
            if let Err(why) = h {
                let fixed = repair && i != pre.slot;
                if fixed {
                    // Rewriting the broken slot with a newer copy of the current header.
                    pre.slot = write_header(&io, pre.slot, &pre.header, pre.header.clone())?;
                    pre.header.sequence_number += 1;
                }
                add(
                    "error",
                    format!("header {} is invalid: {why}", i + 1),
                    fixed,
                );
            }
        }
        let t0 = pre.tables[0].as_ref().ok().cloned();
        match (&pre.tables[0], &pre.tables[1]) {
            (Ok(a), Ok(b)) if a != b => {
                if repair {
                    io.write_at(&a.to_bytes(), REGION_TABLE_OFFSETS[1])?;
                }
                add("error", "the two region tables differ".into(), repair);
            }
            (Ok(_), Ok(_)) => {}
            (Err(why), _) | (_, Err(why)) => {
                let bad = if pre.tables[0].is_err() { 0 } else { 1 };
                if repair {
                    io.write_at(&pre.regions.to_bytes(), REGION_TABLE_OFFSETS[bad])?;
                }
                add(
                    "error",
                    format!("region table {} is invalid: {why}", bad + 1),
                    repair,
                );
            }
        }
        let _ = t0;
        let seq = read_active_log(&io, &pre.header)?;
        validate_log(&seq, pre.file_len)?;
        if !seq.is_empty() {
            for c in seq.iter().flat_map(|e| &e.changes) {
                match c {
                    Change::Data { offset, data } if repair => io.write_at(data, *offset)?,
                    Change::Zero { offset, len } if repair => io.zero_range(*offset, *len)?,
                    Change::Data { offset, data } => io.overlay_page(*offset, data.clone()),
                    Change::Zero { offset, len } => io.overlay_zero(*offset, *len),
                }
            }
            if repair {
                let last = seq.last().unwrap().last_file_offset;
                if last > io.len()? {
                    io.set_len(last)?;
                }
                io.sync()?;
                let h = Header {
                    log_guid: Guid::ZERO,
                    ..pre.header.clone()
                };
                pre.slot = write_header(&io, pre.slot, &pre.header, h)?;
            }
            add(
                "warning",
                format!(
                    "the log holds {} unapplied entr{}",
                    seq.len(),
                    if seq.len() == 1 { "y" } else { "ies" }
                ),
                repair,
            );
        }
        if repair {
            io.sync()?;
        }
        let file_len = io.len()?;
        let Tables {
            meta,
            params,
            geo,
            meta_region: _,
            bat_region: br,
            need,
            entries,
        } = read_tables(&io, &pre.regions)?;
        let entries = &entries[..need as usize];
        let reserved = reserved_spans(&pre.header, &pre.regions);
        for p in bat_problems(&geo, entries, file_len, &reserved, MAX_REPORTED) {
            // Entries that cannot be valid are cleared (the block then reads as zero or from
            // the parent); overlapping blocks need a human, so they are only reported.
            let index = match &p {
                VhdxError::BadBatState { index, .. } | VhdxError::BadBatOffset { index, .. } => {
                    Some(*index)
                }
                _ => None,
            };
            let fixed = repair && index.is_some();
            if let (true, Some(i)) = (fixed, index) {
                io.write_at(&0u64.to_le_bytes(), br.file_offset + i * 8)?;
            }
            add("error", p.to_string(), fixed);
        }
        let mut allocated = 0;
        for (i, &e) in entries.iter().enumerate() {
            let i = i as u64;
            if geo.is_bitmap_index(i) {
                continue;
            }
            let s = bat::state(e);
            if matches!(s, bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT) {
                allocated += 1;
                let end = bat::offset(e).saturating_add(geo.block_size);
                if bat::offset(e) < file_len && end > file_len {
                    add(
                        "warning",
                        format!(
                            "block {} ends past the end of the file (reads as zero there)",
                            geo.block_of_index(i)
                        ),
                        false,
                    );
                }
            }
        }
        if repair {
            io.sync()?;
        }
        drop(io);
        if params.has_parent {
            if let Err(e) = Vhdx::open(path, &OpenOptions::read_only()) {
                add(
                    "error",
                    format!("differencing chain does not open: {e}"),
                    false,
                );
            }
        }
        if meta.item(MERGE_IN_PROGRESS).is_some() {
            add(
                "warning",
                "a merge into the parent was interrupted; run merge again to finish it".into(),
                false,
            );
        }
        let clean = problems.iter().all(|p| p.severity != "error" || p.repaired);
        Ok(CheckReport {
            path: path.to_path_buf(),
            problems,
            log_entries: seq.len(),
            allocated_blocks: allocated,
            file_size: file_len,
            clean,
        })
    }
}

impl CheckReport {
    /// True when no unrepaired error remains.
    pub fn is_clean(&self) -> bool {
        self.clean
    }
}
