//! Reuse of freed file space while the disk is open, so a dynamic disk under trim/rewrite churn
//! keeps a bounded file instead of growing until an offline `compact`.
//!
//! Sources of free space: payload blocks released by a whole-block discard, and, at a writable
//! open, every 1 MiB-aligned gap below the end of the file that no BAT entry, region, log or
//! the header section covers (left, for example, by blocks an interrupted session appended but
//! never committed, or by a BAT that a resize moved). Allocation takes the lowest extent that
//! fits (payload blocks need `block_size`, sector-bitmap blocks 1 MiB, both 1 MiB aligned) and
//! only extends the file when none does; a free extent touching the end of the file is extended
//! rather than skipped. At a clean close, free space at the end of the file is truncated away.
//!
//! Why each step is where it is:
//!
//! 1. **Crash safety — pending until durable.** A discard changes the BAT only in memory; the
//!    change becomes durable when a flush commits it through the log. Handing the old offset to
//!    another block before that could leave, after a crash, the old durable entry and the new
//!    one (committed by a later flush) pointing at the same space. So a free first goes to
//!    `pending`; the flush takes the pending list while it holds the BAT read lock for its
//!    snapshot (a free is pushed only after its BAT change, so every free taken is in the
//!    snapshot or in an earlier, already committed one), and moves those frees to `reusable`
//!    only after its commit succeeded. A failed commit puts them back into `pending`.
//! 2. **In-flight I/O — the gate.** A read or write copies a BAT entry and then issues its
//!    pread/pwrite without any lock; one that copied the entry just before a discard may still
//!    be about to touch the old offset. Every payload I/O on this file therefore holds `gate`
//!    for reading from its BAT lookup until its I/O completes (the thread's own shard of a
//!    sharded lock, `gate.rs`: one atomic each way on a cache line no other thread writes).
//!    The flush that publishes frees takes `gate` for writing once, after its
//!    commit: that waits for every I/O that might still target a freed offset, and any I/O
//!    starting afterwards looks the BAT up after the free and cannot see the old offset. The
//!    drain happens only when there are frees to publish.
//! 3. **Reused space reads as zero.** A new block's BAT entry is published before its data is
//!    written, so its space must read as zero (the contents of an UNMAPPED/ZERO/NOT_PRESENT
//!    block). The hole punched at discard time is not enough: a write that was in flight during
//!    the discard may have landed after the punch, a gap found at open holds whatever the
//!    interrupted session wrote, and a filesystem may not punch holes. So space is zeroed again
//!    (`FileIo::zero_range`: punch, or write zeroes where punching fails) when it is handed out,
//!    under the allocation lock and before the new entry exists. The filesystem reservation
//!    bits of that range are cleared so the new block reserves its extents again.
//! 4. **Differencing disks.** Sector-bitmap bits belong to virtual sectors, not file offsets:
//!    moving a block to reused space changes no bit. A whole-block discard makes the block ZERO,
//!    and a ZERO block is reallocated FULLY_PRESENT (its stale bits are ignored); only a
//!    NOT_PRESENT block becomes PARTIALLY_PRESENT, and its bits were never set. Sector-bitmap
//!    blocks are never freed at run time. When a sector-bitmap block is placed in reused space,
//!    cached bitmap pages in that range (keyed by file offset) are dropped as a precaution.
//! 5. **Truncation only at a clean close.** Each log entry records the file size it was written
//!    at (FlushedFileOffset), and a log whose entry says more than the file holds is refused at
//!    replay (by us and by QEMU). Truncating after a flush would leave that state until the next
//!    commit, so the tail is given back only after the clean header (LogGuid zero) is durable.
//!
//! A shrinking resize frees the payload blocks it drops, and a BAT moved by a growing resize
//! frees its old copy, both like a discard (reusable after the resize's own flush). Dropped
//! sector-bitmap blocks are left to the next open's gap scan: the flush that commits their
//! removal may log their dirty pages, and a replay of that entry would write into reused space.

use parking_lot::{Mutex, RwLockReadGuard};
use std::collections::BTreeMap;

use crate::format::bat::{self, Geometry};
use crate::format::{ALIGN, SECTOR_BITMAP_BLOCK};
use crate::gate::Gate;
use crate::layer::Layer;
use crate::VhdxError;

/// A file range `(offset, length)`.
pub(crate) type FreeRange = (u64, u64);

/// Free file space of one open, writable file (see the module documentation).
#[derive(Default)]
pub(crate) struct FreeSpace {
    /// False for read-only files and fixed disks: nothing is tracked or reused.
    enabled: bool,
    /// Ranges `(offset, length)` freed in memory whose BAT change may not be durable yet.
    pending: Mutex<Vec<(u64, u64)>>,
    /// Ranges no durable BAT entry references and no I/O can still reach: start -> end.
    reusable: Mutex<BTreeMap<u64, u64>>,
    /// Held for reading by every payload I/O from its BAT lookup to its completion.
    gate: Gate<()>,
}

impl FreeSpace {
    /// `gaps` are ranges already safe to reuse (found unreferenced at open).
    pub fn new(enabled: bool, gaps: Vec<(u64, u64)>) -> FreeSpace {
        let fs = FreeSpace {
            enabled,
            ..Default::default()
        };
        if enabled {
            let mut r = fs.reusable.lock();
            for (off, len) in gaps {
                insert(&mut r, off, off + len);
            }
        }
        fs
    }

    /// Held across one payload I/O: from reading the BAT entry until the pread/pwrite is done.
    pub fn io_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read()
    }

    /// Records that a block at `offset` no longer belongs to any entry in memory. Call only
    /// after the BAT change (and only once per change).
    pub fn freed(&self, offset: u64, len: u64) {
        // Only whole 1 MiB units are ever handed out (blocks must start 1 MiB-aligned); a
        // region of a foreign file need not be aligned.
        let (a, z) = (
            offset.next_multiple_of(ALIGN),
            (offset + len) / ALIGN * ALIGN,
        );
        if self.enabled && a < z {
            self.pending.lock().push((a, z - a));
        }
    }

    /// The frees a flush is about to make durable. Call while holding the BAT read lock used
    /// for the flush's snapshot.
    pub fn take_pending(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.pending.lock())
    }

    /// Puts back frees whose commit failed.
    pub fn unpublished(&self, frees: Vec<(u64, u64)>) {
        self.pending.lock().extend(frees);
    }

    /// Called after the commit that made `frees` durable: waits until no I/O that may have
    /// looked up the freed offsets is still running, then makes them reusable.
    pub fn publish(&self, frees: Vec<(u64, u64)>) {
        if frees.is_empty() {
            return;
        }
        drop(self.gate.write());
        let mut r = self.reusable.lock();
        for (off, len) in frees {
            insert(&mut r, off, off + len);
        }
    }

    /// Takes `size` bytes of reusable space: the lowest extent that fits, or else the start of
    /// a free extent ending at `end` (the caller then extends the file past `end`). The space
    /// is not zeroed yet.
    pub fn take(&self, size: u64, end: u64) -> Option<u64> {
        if !self.enabled {
            return None;
        }
        let mut r = self.reusable.lock();
        let fit = r
            .iter()
            .find(|(&s, &e)| e - s >= size)
            .map(|(&s, &e)| (s, e));
        let (s, e) = match fit {
            Some(x) => x,
            None => match r.iter().next_back() {
                Some((&s, &e)) if e == end => (s, e),
                _ => return None,
            },
        };
        r.remove(&s);
        if s + size < e {
            r.insert(s + size, e);
        }
        Some(s)
    }

    /// Returns space taken with [`FreeSpace::take`] that could not be used.
    pub fn give_back(&self, offset: u64, len: u64) {
        if len > 0 {
            insert(&mut self.reusable.lock(), offset, offset + len);
        }
    }

    /// Removes and returns the start of the free extent ending at `end`, if any.
    pub fn take_tail(&self, end: u64) -> Option<u64> {
        if !self.enabled {
            return None;
        }
        let mut r = self.reusable.lock();
        let (&s, &e) = r.iter().next_back()?;
        if e != end {
            return None;
        }
        r.remove(&s);
        Some(s)
    }

    /// Bytes reusable now and bytes waiting for a flush (diagnostics and tests).
    #[cfg(test)]
    pub fn totals(&self) -> (u64, u64) {
        let r = self.reusable.lock();
        let p = self.pending.lock();
        (
            r.iter().map(|(s, e)| e - s).sum(),
            p.iter().map(|(_, l)| l).sum(),
        )
    }
}

/// Adds `[s, e)` to `map`, merging with neighbours so extents stay maximal.
fn insert(map: &mut BTreeMap<u64, u64>, mut s: u64, mut e: u64) {
    if s >= e {
        return;
    }
    if let Some((&ps, &pe)) = map.range(..=s).next_back() {
        if pe >= s {
            debug_assert!(pe <= s, "free range inserted twice");
            s = ps;
            e = e.max(pe);
            map.remove(&ps);
        }
    }
    while let Some((&ns, &ne)) = map.range(s..).next() {
        if ns > e {
            break;
        }
        debug_assert!(ns >= e, "free range inserted twice");
        e = e.max(ne);
        map.remove(&ns);
    }
    map.insert(s, e);
}

/// 1 MiB-aligned ranges below `end` that nothing references: not in `reserved` (header
/// section, log, regions) and not used by any present BAT entry in `entries` (all of them,
/// also those past the virtual size, to be conservative).
pub(crate) fn unused_gaps(
    geo: &Geometry,
    entries: &[u64],
    reserved: &[(u64, u64, &'static str)],
    end: u64,
) -> Vec<(u64, u64)> {
    let mut used: Vec<(u64, u64)> = reserved.iter().map(|r| (r.0, r.1)).collect();
    for (i, &e) in entries.iter().enumerate() {
        let s = bat::state(e);
        let size = if geo.is_bitmap_index(i as u64) {
            if s != bat::SB_PRESENT {
                continue;
            }
            SECTOR_BITMAP_BLOCK
        } else if matches!(s, bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT) {
            geo.block_size
        } else {
            continue;
        };
        // Entries past the virtual size are not validated at open: garbage must not overflow,
        // and nothing past `end` matters.
        let start = bat::offset(e).min(end);
        used.push((start, bat::offset(e).saturating_add(size).min(end)));
    }
    used.sort_unstable();
    let mut gaps = vec![];
    let mut cursor = 0u64;
    for (s, e) in used.into_iter().chain([(end, end)]) {
        let (a, z) = (cursor.next_multiple_of(ALIGN), s / ALIGN * ALIGN);
        if a < z && a < end {
            gaps.push((a, z.min(end) - a));
        }
        cursor = cursor.max(e);
    }
    gaps
}

impl Layer {
    /// Space for a new block of `size` bytes: reused when possible, else appended at `end`
    /// (the file end under the `alloc` lock, which the caller holds). The space reads as zero.
    pub(crate) fn claim_space(&self, end: &mut u64, size: u64) -> Result<u64, VhdxError> {
        let Some(off) = self.space.take(size, *end) else {
            let off = *end;
            self.io.set_len(off + size)?;
            *end += size;
            return Ok(off);
        };
        let old_part = size.min(end.saturating_sub(off));
        let prepared = (|| {
            if off + size > *end {
                self.io.set_len(off + size)?;
            }
            self.io.zero_range(off, old_part)
        })();
        if let Err(e) = prepared {
            self.space.give_back(off, old_part);
            return Err(e);
        }
        *end = (*end).max(off + size);
        self.forget_reserved(off, size);
        if size == SECTOR_BITMAP_BLOCK {
            let mut bm = self.bitmaps.write();
            bm.retain(|&page, _| page < off || page >= off + size);
        }
        Ok(off)
    }

    /// At a clean close: gives free space at the end of the file back to the filesystem.
    /// Only safe once no log entry can be replayed (see the module documentation).
    pub(crate) fn truncate_free_tail(&self) -> Result<(), VhdxError> {
        let mut end = self.alloc.lock();
        let Some(start) = self.space.take_tail(*end) else {
            return Ok(());
        };
        if self.io.len()? > start {
            self.io.set_len(start)?;
            self.io.sync()?;
        }
        *end = start;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::MIB;

    fn extents(fs: &FreeSpace) -> Vec<(u64, u64)> {
        fs.reusable.lock().iter().map(|(&s, &e)| (s, e)).collect()
    }

    #[test]
    fn frees_wait_for_publish_and_coalesce() {
        let fs = FreeSpace::new(true, vec![]);
        fs.freed(4 * MIB, MIB);
        fs.freed(6 * MIB, MIB);
        assert_eq!(
            fs.take(MIB, 100 * MIB),
            None,
            "pending space is not reusable"
        );
        let p = fs.take_pending();
        assert_eq!(fs.totals(), (0, 0));
        fs.publish(p);
        assert_eq!(extents(&fs), vec![(4 * MIB, 5 * MIB), (6 * MIB, 7 * MIB)]);
        fs.give_back(5 * MIB, MIB);
        assert_eq!(extents(&fs), vec![(4 * MIB, 7 * MIB)]);
        assert_eq!(fs.take(2 * MIB, 100 * MIB), Some(4 * MIB));
        assert_eq!(extents(&fs), vec![(6 * MIB, 7 * MIB)]);
        assert_eq!(
            fs.take(2 * MIB, 100 * MIB),
            None,
            "too small, not at the end"
        );
        assert_eq!(
            fs.take(2 * MIB, 7 * MIB),
            Some(6 * MIB),
            "tail extent grows"
        );
        assert_eq!(fs.totals(), (0, 0));
    }

    #[test]
    fn failed_commit_keeps_frees_pending() {
        let fs = FreeSpace::new(true, vec![]);
        fs.freed(8 * MIB, 2 * MIB);
        let p = fs.take_pending();
        fs.unpublished(p);
        assert_eq!(fs.totals(), (0, 2 * MIB));
        assert_eq!(fs.take(MIB, 100 * MIB), None);
    }

    #[test]
    fn disabled_tracks_nothing() {
        let fs = FreeSpace::new(false, vec![(4 * MIB, MIB)]);
        fs.freed(8 * MIB, MIB);
        fs.publish(fs.take_pending());
        assert_eq!(fs.take(MIB, 100 * MIB), None);
        assert_eq!(fs.take_tail(100 * MIB), None);
    }

    #[test]
    fn publish_waits_for_io_in_flight() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let fs = Arc::new(FreeSpace::new(true, vec![]));
        fs.freed(4 * MIB, MIB);
        let io = fs.io_gate();
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (fs, done) = (fs.clone(), done.clone());
            std::thread::spawn(move || {
                fs.publish(fs.take_pending());
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "published while I/O was in flight"
        );
        assert_eq!(fs.take(MIB, 100 * MIB), None);
        drop(io);
        t.join().unwrap();
        assert_eq!(fs.take(MIB, 100 * MIB), Some(4 * MIB));
    }

    #[test]
    fn gaps_skip_reserved_and_used_space() {
        let geo = Geometry::new(2 * MIB as u32, 512, false);
        let reserved = [
            (0, MIB, "the header section"),
            (MIB, 2 * MIB, "the log"),
            (2 * MIB, 3 * MIB, "the metadata region"),
            (3 * MIB, 4 * MIB, "the BAT"),
        ];
        let entries = [
            bat::entry(bat::FULLY_PRESENT, 6 * MIB),
            bat::entry(bat::UNMAPPED, 0),
            bat::entry(bat::FULLY_PRESENT, 12 * MIB),
            bat::entry(bat::NOT_PRESENT, 0),
        ];
        let gaps = unused_gaps(&geo, &entries, &reserved, 20 * MIB);
        assert_eq!(
            gaps,
            vec![(4 * MIB, 2 * MIB), (8 * MIB, 4 * MIB), (14 * MIB, 6 * MIB)]
        );
        // A file that is exactly full has no gaps; an unaligned end is rounded down.
        let full = unused_gaps(&geo, &entries, &reserved, 14 * MIB);
        assert_eq!(full, vec![(4 * MIB, 2 * MIB), (8 * MIB, 4 * MIB)]);
        let odd = unused_gaps(&geo, &entries, &reserved, 15 * MIB + 7);
        assert_eq!(odd.last(), Some(&(14 * MIB, MIB)));
    }

    #[test]
    fn garbage_entries_past_the_needed_ones_do_not_overflow() {
        let geo = Geometry::new(2 * MIB as u32, 512, false);
        let reserved = [(0, 4 * MIB, "the header section")];
        let entries = [
            bat::entry(bat::FULLY_PRESENT, 6 * MIB),
            !0xf_ffff | bat::FULLY_PRESENT as u64,
        ];
        let gaps = unused_gaps(&geo, &entries, &reserved, 10 * MIB);
        assert_eq!(gaps, vec![(4 * MIB, 2 * MIB), (8 * MIB, 2 * MIB)]);
    }
}
