//! Compacting: blocks holding only zeroes are released, then blocks are moved down into holes
//! and the file is truncated.
//!
//! Crash safety: a block is only ever copied into space no committed BAT entry references;
//! its entry is switched through the log after the copy is synced, and space freed by a move is
//! reused only after the switch is committed.

use std::fs::OpenOptions as FsOpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::fileio::FaultInjector;

use crate::format::{bat, MIB, SECTOR_BITMAP_BLOCK};
use crate::layer::{reserved_spans, DataGuid};
use crate::{OpenOptions, Vhdx, VhdxError};

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CompactReport {
    /// Blocks that held only zeroes and were released.
    pub blocks_zeroed: u64,
    /// Blocks moved towards the start of the file.
    pub blocks_moved: u64,
    pub file_size_before: u64,
    pub file_size_after: u64,
}

impl Vhdx {
    /// Compacts the disk at `path` (locked exclusively: [`VhdxError::Locked`] if it is open
    /// elsewhere). Cancelling leaves a valid file.
    pub fn compact(
        path: &Path,
        progress: &dyn Fn(u64, u64),
        cancel: &AtomicBool,
    ) -> Result<CompactReport, VhdxError> {
        Self::compact_with_fault(path, progress, cancel, None)
    }

    /// [`Vhdx::compact`] with a simulated crash (tests).
    #[doc(hidden)]
    pub fn compact_with_fault(
        path: &Path,
        progress: &dyn Fn(u64, u64),
        cancel: &AtomicBool,
        fault: Option<Arc<FaultInjector>>,
    ) -> Result<CompactReport, VhdxError> {
        let mut report = CompactReport {
            file_size_before: std::fs::metadata(path)?.len(),
            ..Default::default()
        };
        let d = Vhdx::open(
            path,
            &OpenOptions {
                fault: fault.clone(),
                ..Default::default()
            },
        )?;
        let l = d.top();
        if l.params.leave_blocks_allocated {
            return Err(VhdxError::Unsupported(
                "compacting a fixed disk (its blocks must stay allocated)",
            ));
        }
        // Moving blocks does not change what the disk reads, so the DataWriteGuid stays and
        // differencing children remain valid.
        l.begin_session(DataGuid::Keep)?;
        let geo = l.geo;
        let blocks = geo.payload_blocks(l.vsize());
        let total = blocks * 2;
        let mut buf = vec![0u8; MIB.min(geo.block_size) as usize];
        for b in 0..blocks {
            if cancel.load(Ordering::Relaxed) {
                d.flush()?;
                return Err(VhdxError::Cancelled);
            }
            let pi = geo.payload_index(b);
            let e = l.bat.read().entries[pi as usize];
            if bat::state(e) == bat::FULLY_PRESENT {
                let mut zero = true;
                let mut off = 0;
                while zero && off < geo.block_size {
                    l.io.read_at(&mut buf, bat::offset(e) + off)?;
                    zero = buf.iter().all(|&x| x == 0);
                    off += buf.len() as u64;
                }
                if zero {
                    let state = if geo.differencing {
                        bat::ZERO
                    } else {
                        bat::NOT_PRESENT
                    };
                    l.bat.write().entries[pi as usize] = bat::entry(state, 0);
                    l.mark_bat_dirty(pi);
                    report.blocks_zeroed += 1;
                }
            }
            progress(b + 1, total);
        }
        d.flush()?;

        let reserved = {
            let st = l.state.lock();
            reserved_spans(&st.header, &st.regions)
        };
        let mut used: Vec<(u64, u64, u64)> = {
            let bat = l.bat.read();
            let n = geo.bat_entries(l.vsize()) as usize;
            bat.entries[..n]
                .iter()
                .enumerate()
                .filter_map(|(i, &e)| {
                    let sb = geo.is_bitmap_index(i as u64);
                    let s = bat::state(e);
                    let size = if sb && s == bat::SB_PRESENT {
                        SECTOR_BITMAP_BLOCK
                    } else if !sb && matches!(s, bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT) {
                        geo.block_size
                    } else {
                        return None;
                    };
                    Some((bat::offset(e), size, i as u64))
                })
                .collect()
        };
        used.sort_unstable();
        let mut cursor = 0u64;
        let mut freed: Vec<(u64, u64)> = vec![];
        let mut moved_bitmap = false;
        let fit = |mut c: u64, size: u64| {
            while let Some(r) = reserved.iter().find(|r| c < r.1 && r.0 < c + size) {
                c = r.1;
            }
            c
        };
        for (k, &(off, size, index)) in used.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                d.flush()?;
                return Err(VhdxError::Cancelled);
            }
            let dst = fit(cursor, size);
            if dst + size <= off {
                if freed.iter().any(|f| dst < f.1 && f.0 < dst + size) {
                    d.flush()?;
                    freed.clear();
                }
                let mut done = 0;
                while done < size {
                    let n = (size - done).min(buf.len() as u64) as usize;
                    l.io.read_at(&mut buf[..n], off + done)?;
                    l.io.write_at(&buf[..n], dst + done)?;
                    done += n as u64;
                }
                {
                    let mut w = l.bat.write();
                    let e = w.entries[index as usize];
                    w.entries[index as usize] = bat::entry(bat::state(e), dst);
                    l.mark_bat_dirty(index);
                }
                moved_bitmap |= geo.is_bitmap_index(index);
                freed.push((off, off + size));
                report.blocks_moved += 1;
                cursor = dst + size;
            } else {
                cursor = cursor.max(off + size);
            }
            progress(
                blocks + (k as u64 + 1) * blocks / used.len().max(1) as u64,
                total,
            );
        }
        d.flush()?;
        if moved_bitmap {
            // Cached bitmap pages are keyed by file offset; nothing is dirty after the flush.
            l.bitmaps.write().clear();
        }
        let end = reserved.iter().map(|r| r.1).max().unwrap_or(0).max(cursor);
        // The layer must close (clean headers) before the file is truncated below.
        drop(l);
        drop(d);
        if fault.is_some_and(|f| f.fired()) {
            return Err(VhdxError::InjectedFault);
        }
        let f = FsOpenOptions::new().write(true).open(path)?;
        if f.metadata()?.len() > end {
            f.set_len(end)?;
            f.sync_all()?;
        }
        report.file_size_after = f.metadata()?.len();
        progress(total, total);
        Ok(report)
    }
}
