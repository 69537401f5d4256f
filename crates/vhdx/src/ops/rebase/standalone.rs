//! `--no-parent`: a differencing disk becomes a standalone dynamic one holding everything it
//! showed. Each step leaves a file that opens and shows the same content:
//!
//! 1. Copy the parent's data into the child wherever the child shows it (partially present
//!    blocks get every sector filled, so each becomes a complete block); flush.
//! 2. Mark partially present blocks fully present; flush. (Valid in a differencing disk too,
//!    and in any mix: each such block is complete.)
//! 3. Drop the sector-bitmap entries (nothing uses them now); flush. Their space stays
//!    unreferenced until the next open's gap scan: the flush that drops them may log their
//!    pages, and replaying it must not write into reused space.
//! 4. Clear HasParent and remove the parent locator, in one logged metadata commit.
//!
//! Cancel (only during step 1, the long one) leaves the child on its parent.

use std::sync::atomic::{AtomicBool, Ordering};

use super::{check_child, coalesce, gaps, within};
use crate::disk::Chain;
use crate::format::metadata::{self, FLAG_REQUIRED};
use crate::format::{bat, FILE_PARAMETERS, MIB, PARENT_LOCATOR};
use crate::layer::{DataGuid, Layer};
use crate::ops::merge::BlockData;
use crate::{OpenOptions, Vhdx, VhdxError};

pub(super) fn run(
    child: &std::path::Path,
    rw: &OpenOptions,
    progress: &dyn Fn(u64, u64),
    cancel: &AtomicBool,
) -> Result<(), VhdxError> {
    let c = Vhdx::open(child, rw)?;
    let chain = c.chain();
    let l = chain.top();
    check_child(child, l)?;
    l.begin_session(DataGuid::Keep)?;
    let vs = c.virtual_size();
    let below = Chain {
        layers: chain.layers[1..].to_vec(),
        read_only: true,
    };
    let alloc = coalesce(below.allocated_ranges());
    let bs = l.geo.block_size;
    let mut buf = vec![0u8; MIB as usize];
    for b in 0..l.geo.payload_blocks(vs) {
        if cancel.load(Ordering::Relaxed) {
            c.flush()?;
            return Err(VhdxError::Cancelled);
        }
        let (start, end) = (b * bs, ((b + 1) * bs).min(vs));
        let data = chain.block_data(b)?;
        // A block with data of its own keeps whatever its unset sectors hold on disk: fill
        // them all. A new block reads as zero until written: only non-zero data goes in.
        let partial = matches!(data, BlockData::Runs(_));
        for (s, e) in gaps(data, start, end) {
            let parts = if partial {
                vec![(s, e)]
            } else {
                within(&alloc, s, e)
            };
            for (s, e) in parts {
                copy_down(&c, s, e, &mut buf, partial)?;
            }
        }
        progress(end, vs);
    }
    c.flush()?;
    set_all(l, vs, |i, e| {
        (!l.geo.is_bitmap_index(i) && bat::state(e) == bat::PARTIALLY_PRESENT)
            .then(|| bat::entry(bat::FULLY_PRESENT, bat::offset(e)))
    })?;
    set_all(l, vs, |i, e| {
        (l.geo.is_bitmap_index(i) && e != 0).then_some(bat::entry(bat::SB_NOT_PRESENT, 0))
    })?;
    let pages = {
        let mut st = l.state.lock();
        let mut params = st
            .meta
            .item(FILE_PARAMETERS)
            .ok_or(VhdxError::MissingMetadata("file parameters"))?
            .to_vec();
        params[4] &= !2; // HasParent
        let mut ranges = st.meta.add_item(FILE_PARAMETERS, FLAG_REQUIRED, &params)?;
        st.meta.remove_item(PARENT_LOCATOR);
        ranges.push((0, metadata::TABLE_SIZE));
        Layer::metadata_pages(&st, &ranges)
    };
    l.flush_with(pages)
}

/// Writes what the child shows in `s..e` (its parent's data there) into the child itself:
/// everything when `all`, else only the non-zero sectors.
fn copy_down(c: &Vhdx, s: u64, e: u64, buf: &mut [u8], all: bool) -> Result<(), VhdxError> {
    let ls = c.logical_sector_size() as usize;
    let mut pos = s;
    while pos < e {
        let n = (e - pos).min(buf.len() as u64) as usize;
        c.read(&mut buf[..n], pos)?;
        let zero = |i: usize| !all && buf[i..i + ls].iter().all(|&x| x == 0);
        let mut i = 0;
        while i < n {
            if zero(i) {
                i += ls;
                continue;
            }
            let mut j = i + ls;
            while j < n && !zero(j) {
                j += ls;
            }
            c.write(&buf[i..j], pos + i as u64)?;
            i = j;
        }
        pos += n as u64;
    }
    Ok(())
}

/// Replaces each BAT entry (of a disk of `vs` bytes) that `change` maps to a new value, then
/// commits the changed pages.
fn set_all(l: &Layer, vs: u64, change: impl Fn(u64, u64) -> Option<u64>) -> Result<(), VhdxError> {
    {
        let _a = l.alloc.lock();
        let mut w = l.bat.write();
        let n = (l.geo.bat_entries(vs) as usize).min(w.entries.len());
        for i in 0..n {
            if let Some(e) = change(i as u64, w.entries[i]) {
                w.entries[i] = e;
                l.mark_bat_dirty(i as u64);
            }
        }
    }
    l.flush_with(vec![])
}
