//! Merging a differencing disk into its parent.
//!
//! Crash safety: before the parent is touched, the child records (user metadata item
//! `MERGE_IN_PROGRESS`) the DataWriteGuid the parent will carry once the merge writes to it.
//! The child then opens against either the parent's old or new DataWriteGuid, and its view of
//! the disk stays correct at every instant (the merge only copies ranges the child itself
//! holds). Running merge again resumes: the copy is idempotent.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::fileio::FaultInjector;

use crate::disk::Chain;
use crate::format::metadata::FLAG_USER;
use crate::format::{bat, MERGE_IN_PROGRESS, MIB};
use crate::guid::Guid;
use crate::layer::DataGuid;
use crate::{OpenOptions, Vhdx, VhdxError};

/// What a child block contributes to the merged result.
pub(crate) enum BlockData {
    None,
    Zero,
    /// Virtual (offset, length) runs present in the child.
    Runs(Vec<(u64, u64)>),
}

impl Chain {
    /// Which parts of payload block `b` of the top file hold data of their own.
    pub(crate) fn block_data(&self, b: u64) -> Result<BlockData, VhdxError> {
        let bs = self.top().geo.block_size;
        self.range_data(b * bs, ((b + 1) * bs).min(self.top().vsize()))
    }

    /// [`Chain::block_data`] limited to `start..end`, which must lie inside one block.
    pub(crate) fn range_data(&self, start: u64, end: u64) -> Result<BlockData, VhdxError> {
        let l = self.top();
        let bs = l.geo.block_size;
        let b = start / bs;
        let end = end.min(l.vsize());
        if end <= start {
            return Ok(BlockData::None);
        }
        let e = l.bat.read().entries[l.geo.payload_index(b) as usize];
        Ok(match bat::state(e) {
            bat::FULLY_PRESENT => BlockData::Runs(vec![(start, end - start)]),
            bat::PARTIALLY_PRESENT => {
                let sb = bat::offset(l.bat.read().entries[l.geo.bitmap_index(b) as usize]);
                let ls = l.geo.logical_sector;
                let mut runs: Vec<(u64, u64)> = vec![];
                for s in start / ls..end / ls {
                    if self.bitmap_bit(l, sb, s)? {
                        match runs.last_mut() {
                            Some(r) if r.0 + r.1 == s * ls => r.1 += ls,
                            _ => runs.push((s * ls, ls)),
                        }
                    }
                }
                BlockData::Runs(runs)
            }
            bat::ZERO | bat::UNMAPPED | bat::UNMAPPED_V095 if l.geo.differencing => BlockData::Zero,
            _ => BlockData::None,
        })
    }
}

impl Vhdx {
    /// Merges differencing disk `child` into its parent, then deletes `child`.
    ///
    /// `progress(done, total)` is called per block; setting `cancel` stops after the current
    /// block with [`VhdxError::Cancelled`], leaving both files valid; merging again resumes.
    /// Both files are locked exclusively ([`VhdxError::Locked`] if either is open elsewhere).
    pub fn merge_into_parent(
        child: &Path,
        progress: &dyn Fn(u64, u64),
        cancel: &AtomicBool,
    ) -> Result<(), VhdxError> {
        Self::merge_with_fault(child, progress, cancel, None)
    }

    /// [`Vhdx::merge_into_parent`] with a simulated crash shared by the child and parent files.
    #[doc(hidden)]
    pub fn merge_with_fault(
        child: &Path,
        progress: &dyn Fn(u64, u64),
        cancel: &AtomicBool,
        fault: Option<Arc<FaultInjector>>,
    ) -> Result<(), VhdxError> {
        let rw = OpenOptions {
            fault: fault.clone(),
            ..Default::default()
        };
        // The parent is read through the child's chain but written through its own exclusive
        // open below, so the chain's copy must not hold a (conflicting) shared lock on it.
        let c = Vhdx::open_chain(child, &rw, true)?;
        if !c.top().params.has_parent {
            return Err(VhdxError::NotDifferencing(child.to_path_buf()));
        }
        let chain = c.chain();
        let parent_path = chain[1].path.clone();
        let target = match c.top().merge_target {
            Some(g) => g,
            None => {
                let g = Guid::random();
                c.top()
                    .set_metadata_item(MERGE_IN_PROGRESS, FLAG_USER, Some(&g.0))?;
                g
            }
        };
        let p = Vhdx::open(&parent_path, &rw)?;
        // The chain read the parent before it was locked: make sure nobody changed it since.
        if p.top().header().data_write_guid != chain[1].header().data_write_guid {
            return Err(VhdxError::ParentLinkageMismatch {
                child: child.to_path_buf(),
                parent: parent_path,
                expected: chain[1].header().data_write_guid.to_string(),
                found: p.top().header().data_write_guid,
            });
        }
        p.top().begin_session(DataGuid::Set(target))?;
        let vs = c.virtual_size();
        // The merged disk is what the child showed, size included: a child that was grown or
        // (with force) shrunk carries its size into the parent. Shrinking the parent only drops
        // what the child cannot see, so the child's view stays the same at every instant.
        if vs != p.virtual_size() {
            p.resize(vs, true)?;
        }
        let total = c.top().geo.payload_blocks(vs);
        let mut buf = vec![0u8; MIB as usize];
        for b in 0..total {
            if cancel.load(Ordering::Relaxed) {
                p.flush()?;
                return Err(VhdxError::Cancelled);
            }
            match chain.block_data(b)? {
                BlockData::None => {}
                BlockData::Zero => {
                    let bs = c.top().geo.block_size;
                    let end = ((b + 1) * bs).min(vs).min(p.virtual_size());
                    if b * bs < end {
                        p.discard(b * bs, end - b * bs)?;
                    }
                }
                BlockData::Runs(runs) => {
                    for (off, len) in runs {
                        let mut done = 0;
                        while done < len {
                            let n = (len - done).min(buf.len() as u64) as usize;
                            c.read(&mut buf[..n], off + done)?;
                            p.write(&buf[..n], off + done)?;
                            done += n as u64;
                        }
                    }
                }
            }
            progress(b + 1, total);
        }
        p.flush()?;
        drop(p);
        drop(chain);
        drop(c);
        if fault.is_some_and(|f| f.fired()) {
            // The simulated machine stopped; nothing after the crash may happen.
            return Err(VhdxError::InjectedFault);
        }
        std::fs::remove_file(child)?;
        Ok(())
    }
}
