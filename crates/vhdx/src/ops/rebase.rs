//! Rebase: give a differencing disk another parent, or none.
//!
//! - **Onto a new parent** (safe): wherever the child has no data of its own and the old and
//!   new parents differ, the old content is copied into the child first; then the parent
//!   locator is switched in one logged metadata commit. A crash or cancel before the switch
//!   leaves the child on its old parent showing the same content (it only gained copies of what
//!   it showed anyway); after it, on the new one, still the same.
//! - **Relink** (`--unsafe`): only the locator changes, for a parent that was moved or renamed
//!   (its data must be the old parent's; nothing is compared).
//! - **Standalone** (`--no-parent`): see `rebase/standalone.rs`.
//!
//! The child's DataWriteGuid is kept: what it shows does not change, so its own children stay
//! valid. The new parent is held with a shared lock throughout, so nobody changes it meanwhile.

mod standalone;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::create::parent_locator;
use crate::disk::Chain;
use crate::fileio::FaultInjector;
use crate::format::metadata::{FLAG_REQUIRED, FLAG_VIRTUAL_DISK};
use crate::format::{MIB, PARENT_LOCATOR};
use crate::layer::{DataGuid, Layer, LayerOptions, ReadOnlyReplay};
use crate::ops::merge::BlockData;
use crate::{OpenOptions, Vhdx, VhdxError};
use vireo_block::LockKind;

/// What a rebase does to the child's parent.
#[derive(Clone, Copy, Debug)]
pub enum Rebase<'a> {
    /// Onto this parent, copying into the child whatever differs, so its content stays.
    Onto(&'a Path),
    /// Onto this parent, rewriting only the parent locator: for a parent that was moved or
    /// renamed. Nothing is compared; the new parent must hold the old one's data.
    Relink(&'a Path),
    /// No parent: the child becomes a standalone dynamic disk holding everything it showed.
    Standalone,
}

impl Vhdx {
    /// Changes or removes the parent of differencing disk `child` (see [`Rebase`]).
    ///
    /// `progress(done, total)` is called per block of the copy; setting `cancel` stops it with
    /// [`VhdxError::Cancelled`], leaving the child on its old parent with the same content.
    /// Refused: a new parent that is the child or depends on it ([`VhdxError::RebaseLoop`]),
    /// of another virtual or sector size ([`VhdxError::ParentSizeMismatch`],
    /// [`VhdxError::ParentSectorMismatch`]), a child that is not differencing or has an
    /// unfinished merge.
    pub fn rebase(
        child: &Path,
        how: Rebase,
        progress: &dyn Fn(u64, u64),
        cancel: &AtomicBool,
    ) -> Result<(), VhdxError> {
        Self::rebase_with_fault(child, how, progress, cancel, None)
    }

    /// [`Vhdx::rebase`] with a simulated crash of the child file.
    #[doc(hidden)]
    pub fn rebase_with_fault(
        child: &Path,
        how: Rebase,
        progress: &dyn Fn(u64, u64),
        cancel: &AtomicBool,
        fault: Option<Arc<FaultInjector>>,
    ) -> Result<(), VhdxError> {
        let rw = OpenOptions {
            fault,
            ..Default::default()
        };
        match how {
            Rebase::Onto(parent) => onto(child, parent, &rw, progress, cancel),
            Rebase::Relink(parent) => relink(child, parent, &rw),
            Rebase::Standalone => standalone::run(child, &rw, progress, cancel),
        }
    }
}

/// Refuses a child that cannot be rebased.
fn check_child(child: &Path, l: &Layer) -> Result<(), VhdxError> {
    if !l.params.has_parent {
        return Err(VhdxError::NotDifferencing(child.to_path_buf()));
    }
    if l.merge_target.is_some() {
        return Err(VhdxError::MergeUnfinished(child.to_path_buf()));
    }
    Ok(())
}

/// Refuses `parent` when its chain passes through `child` (which it may, as a descendant,
/// before the child is locked): read without locks, only to learn the files.
fn check_loop(child: &Path, parent: &Path) -> Result<(), VhdxError> {
    let me = fs::metadata(child)?;
    let unlocked = OpenOptions {
        read_only: true,
        no_lock: true,
        ..Default::default()
    };
    let chain = match Vhdx::open(parent, &unlocked) {
        Ok(p) => p.chain(),
        // A chain that loops back is one that passes through something twice.
        Err(VhdxError::ParentLoop(_)) => {
            return Err(VhdxError::RebaseLoop {
                child: child.to_path_buf(),
                parent: parent.to_path_buf(),
            })
        }
        Err(e) => return Err(e),
    };
    for l in chain.iter() {
        let m = fs::metadata(&l.path)?;
        if (m.dev(), m.ino()) == (me.dev(), me.ino()) {
            return Err(VhdxError::RebaseLoop {
                child: child.to_path_buf(),
                parent: parent.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Opens the new parent (shared lock) and checks it fits a child of `size` and `sector`.
fn open_parent(child: &Path, parent: &Path, size: u64, sector: u32) -> Result<Vhdx, VhdxError> {
    let p = Vhdx::open(parent, &OpenOptions::read_only())?;
    if p.virtual_size() != size {
        return Err(VhdxError::ParentSizeMismatch {
            child: child.to_path_buf(),
            child_size: size,
            parent: parent.to_path_buf(),
            parent_size: p.virtual_size(),
        });
    }
    if p.logical_sector_size() != sector {
        return Err(VhdxError::ParentSectorMismatch {
            child: child.to_path_buf(),
            parent: parent.to_path_buf(),
            child_sector: sector,
            parent_sector: p.logical_sector_size(),
        });
    }
    Ok(p)
}

/// Points `l`'s parent locator at `parent` (whose DataWriteGuid it then expects), in one
/// logged metadata commit.
fn write_locator(child: &Path, l: &Layer, parent: &Vhdx) -> Result<(), VhdxError> {
    let loc = parent_locator(child, &parent.path(), parent.top().header().data_write_guid)?;
    l.set_metadata_item(
        PARENT_LOCATOR,
        FLAG_VIRTUAL_DISK | FLAG_REQUIRED,
        Some(&loc.to_bytes()),
    )
}

fn relink(child: &Path, parent: &Path, rw: &OpenOptions) -> Result<(), VhdxError> {
    check_loop(child, parent)?;
    // The child alone: its old parent may be gone (that is why it is being relinked).
    let l = Layer::open(
        child,
        &LayerOptions {
            read_only: false,
            lock: Some(LockKind::Exclusive),
            replay: ReadOnlyReplay::InMemory,
            fault: rw.fault.clone(),
        },
    )?;
    check_child(child, &l)?;
    let p = open_parent(child, parent, l.vsize(), l.params.logical_sector)?;
    l.begin_session(DataGuid::Keep)?;
    write_locator(child, &l, &p)
}

fn onto(
    child: &Path,
    parent: &Path,
    rw: &OpenOptions,
    progress: &dyn Fn(u64, u64),
    cancel: &AtomicBool,
) -> Result<(), VhdxError> {
    check_loop(child, parent)?;
    let c = Vhdx::open(child, rw)?;
    let chain = c.chain();
    check_child(child, chain.top())?;
    let vs = c.virtual_size();
    let p = open_parent(child, parent, vs, c.logical_sector_size())?;
    chain.top().begin_session(DataGuid::Keep)?;
    let same = {
        let (a, b) = (fs::metadata(&chain[1].path)?, fs::metadata(p.path())?);
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    };
    if !same {
        // Only where either parent holds anything can they differ.
        let old_below = Chain {
            layers: chain.layers[1..].to_vec(),
            read_only: true,
        };
        let mut alloc = old_below.allocated_ranges();
        alloc.extend(p.allocated_ranges());
        let alloc = coalesce(alloc);
        let bs = chain.top().geo.block_size;
        let mut bufs = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
        for b in 0..chain.top().geo.payload_blocks(vs) {
            if cancel.load(Ordering::Relaxed) {
                c.flush()?;
                return Err(VhdxError::Cancelled);
            }
            let (start, end) = (b * bs, ((b + 1) * bs).min(vs));
            for (s, e) in gaps(chain.block_data(b)?, start, end) {
                for (s, e) in within(&alloc, s, e) {
                    copy_differences(&c, &p, s, e, &mut bufs)?;
                }
            }
            progress(end, vs);
        }
        // The copies are durable before the locator can point away from the old parent.
        c.flush()?;
    }
    write_locator(child, chain.top(), &p)
}

/// The parts of `start..end` (inside one block) where the child shows its parent.
pub(super) fn gaps(data: BlockData, start: u64, end: u64) -> Vec<(u64, u64)> {
    match data {
        BlockData::None => vec![(start, end)],
        BlockData::Zero => vec![],
        BlockData::Runs(runs) => {
            let mut out = vec![];
            let mut pos = start;
            for (off, len) in runs {
                if off > pos {
                    out.push((pos, off));
                }
                pos = pos.max(off + len);
            }
            if pos < end {
                out.push((pos, end));
            }
            out
        }
    }
}

/// Sorted, merged `(start, end)` ranges from `(offset, length)` ones.
pub(super) fn coalesce(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = vec![];
    for (o, l) in ranges {
        match out.last_mut() {
            Some(last) if o <= last.1 => last.1 = last.1.max(o + l),
            _ => out.push((o, o + l)),
        }
    }
    out
}

/// The parts of `s..e` covered by `ranges` (sorted, merged `(start, end)`).
pub(super) fn within(ranges: &[(u64, u64)], s: u64, e: u64) -> Vec<(u64, u64)> {
    let first = ranges.partition_point(|r| r.1 <= s);
    ranges[first..]
        .iter()
        .take_while(|r| r.0 < e)
        .map(|r| (r.0.max(s), r.1.min(e)))
        .collect()
}

/// Copies into the child (where it shows its old parent) every sector of `s..e` whose content
/// differs in the new parent `p`.
fn copy_differences(
    c: &Vhdx,
    p: &Vhdx,
    s: u64,
    e: u64,
    (old, new): &mut (Vec<u8>, Vec<u8>),
) -> Result<(), VhdxError> {
    let ls = c.logical_sector_size() as usize;
    let mut pos = s;
    while pos < e {
        let n = (e - pos).min(old.len() as u64) as usize;
        c.read(&mut old[..n], pos)?;
        p.read(&mut new[..n], pos)?;
        let differs = |i: usize| old[i..i + ls] != new[i..i + ls];
        let mut i = 0;
        while i < n {
            if !differs(i) {
                i += ls;
                continue;
            }
            let mut j = i + ls;
            while j < n && differs(j) {
                j += ls;
            }
            c.write(&old[i..j], pos + i as u64)?;
            i = j;
        }
        pos += n as u64;
    }
    Ok(())
}
