//! Live merge: merging the top (differencing) file into its parent while other threads keep
//! reading and writing through the same [`Vhdx`], as Hyper-V merges a checkpoint of a running VM.
//!
//! How it works, and why:
//!
//! - **Dirty tracking.** While a merge copies, every write and discard marks the units it
//!   touched in a bitmap ([`DirtyTracker`]), after the I/O completed and before the I/O lets go
//!   of the chain. A unit is 64 KiB (larger only for disks over 1 TiB, so the bitmap stays at
//!   most 2 MiB; never larger than a block): a 4 KiB random write then costs a 64 KiB re-copy,
//!   where 1 MiB units let 4 threads of 4 KiB random writes outrun the copy (`examples/
//!   livemerge`). The copier clears a unit's bit *before* reading it, so a write racing a copy
//!   always leaves its bit set and is copied again. When no merge runs the cost is one relaxed
//!   atomic load per write. Tracking starts under the exclusive chain lock, so no write is half
//!   way through when it starts (such a write could otherwise land after the first pass read its
//!   block, unmarked).
//! - **Iterative copy.** The first pass copies every block the child holds (idempotently, as the
//!   offline merge does); later passes copy only the units dirtied meanwhile, until few remain
//!   (or after a bounded number of passes, when the guest writes faster than we copy).
//! - **Pivot.** `Vhdx.chain` is a (sharded) read-write lock every I/O holds shared for its
//!   duration (`gate.rs`); the pivot holds it exclusively, and I/O pauses only for: copying the
//!   last dirty units, flushing the parent, deleting the child (and syncing its directory),
//!   swapping the chain. That order is
//!   what keeps a crash harmless: no write may reach the parent while the child file can still
//!   be opened, because the child would hide that write behind its own older data.
//! - **Crash safety before the pivot** reuses the offline merge's protocol: the child first
//!   records (`MERGE_IN_PROGRESS`) the DataWriteGuid the parent is about to carry, so it opens
//!   against the parent's old or new GUID; the parent only receives data the child holds, which
//!   the child hides, so the child's view is the same at every instant. After a crash either
//!   `Vhdx::merge_into_parent` (offline) or another `merge_live` resumes. Data copied from the
//!   child's unflushed writes may reach the parent early; that is only ever data the guest
//!   wrote, never a stale value.
//! - **Locks.** The running chain holds the parent open read-only with a shared lock; the merge
//!   needs it read-write and exclusive. A second descriptor takes a shared lock next to the
//!   chain's, the chain's descriptor drops its own, and the new descriptor converts its lock to
//!   exclusive (an OFD lock converts atomically against other owners). At every instant one of
//!   our descriptors holds at least a shared lock, so no other process can open the parent for
//!   writing in between; if someone else shares it (a sibling checkpoint, a reader) the upgrade
//!   fails with [`VhdxError::Locked`] and the chain gets its shared lock back. On cancel the
//!   order reverses: the new descriptor downgrades to a read lock over the whole file, the old
//!   one re-takes its shared lock, then the new one closes.
//! - **Reads of the old parent** go on through the chain's read-only layer, whose BAT copy goes
//!   stale as the merge writes: harmless, because the merge only changes parent ranges the
//!   child holds itself, and the child never reads the parent there. (Sizing the parent to the
//!   child first only changes it past the child's end, which the child never reads either.)

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::disk::Chain;
use crate::format::metadata::FLAG_USER;
use crate::format::{MERGE_IN_PROGRESS, MIB};
use crate::guid::Guid;
use crate::layer::{DataGuid, Layer, LayerOptions, ReadOnlyReplay};
use crate::ops::merge::BlockData;
use crate::{Vhdx, VhdxError};
use vireo_block::LockKind;

/// Smallest dirty-tracking unit.
const MIN_UNIT: u64 = 64 * 1024;
/// Most dirty-tracking bits per disk (2 MiB of bitmap).
const MAX_UNITS: u64 = 1 << 24;
/// Pause I/O for the pivot once at most this many bytes (and 1/16 of the disk) are left to
/// copy: the pause then lasts about as long as copying 16 MiB and flushing the parent.
const PIVOT_BYTES: u64 = 16 * MIB;
/// Passes after the first before pivoting anyway (a guest that dirties faster than we copy
/// would otherwise keep the merge from ever finishing; it pays with a longer pause).
const MAX_PASSES: u32 = 16;

/// Which units of the disk were written since a live merge started copying.
#[derive(Default)]
pub(crate) struct DirtyTracker {
    /// Read by every write; set and cleared only under the exclusive chain lock.
    active: AtomicBool,
    /// Set while a `merge_live` runs, so two cannot run at once.
    claimed: AtomicBool,
    bits: RwLock<Bits>,
}

#[derive(Default)]
struct Bits {
    /// Bytes per bit (a power of two dividing the block size).
    unit: u64,
    words: Vec<AtomicU64>,
}

impl DirtyTracker {
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Records a write or discard of `offset..offset+len`. The caller holds the chain lock
    /// shared, which orders this against `start`/`stop` (taken exclusively).
    #[inline]
    pub fn mark(&self, offset: u64, len: u64) {
        if self.active.load(Ordering::Relaxed) && len > 0 {
            self.mark_slow(offset, len);
        }
    }

    #[cold]
    fn mark_slow(&self, offset: u64, len: u64) {
        let bits = self.bits.read();
        if bits.unit == 0 {
            // Stopped (cannot happen under the chain lock; never divide by zero regardless).
            return;
        }
        for u in offset / bits.unit..=(offset + len - 1) / bits.unit {
            if let Some(w) = bits.words.get((u / 64) as usize) {
                // Release: whoever sees the bit (take, Acquire) also sees the write's effects.
                w.fetch_or(1 << (u % 64), Ordering::AcqRel);
            }
        }
    }

    /// Starts tracking `size` bytes in units of `unit`, all clean. Caller holds the chain
    /// lock exclusively.
    fn start(&self, size: u64, unit: u64) {
        let mut bits = self.bits.write();
        let words = size.div_ceil(unit).div_ceil(64);
        *bits = Bits {
            unit,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        };
        self.active.store(true, Ordering::Relaxed);
    }

    fn stop(&self) {
        self.active.store(false, Ordering::Relaxed);
        *self.bits.write() = Bits::default();
    }

    /// Clears unit `u`'s bit; true if it was set.
    fn take(&self, u: u64) -> bool {
        let bits = self.bits.read();
        bits.words
            .get((u / 64) as usize)
            .is_some_and(|w| w.fetch_and(!(1 << (u % 64)), Ordering::AcqRel) >> (u % 64) & 1 == 1)
    }

    /// The units dirty right now, in order.
    fn dirty_units(&self) -> Vec<u64> {
        let bits = self.bits.read();
        let mut out = vec![];
        for (i, w) in bits.words.iter().enumerate() {
            let mut v = w.load(Ordering::Acquire);
            while v != 0 {
                let b = v.trailing_zeros() as u64;
                out.push(i as u64 * 64 + b);
                v &= v - 1;
            }
        }
        out
    }
}

/// The parent opened read-write and locked exclusively for the merge, as a disk of its own
/// ([parent, grandparents...], the grandparents shared with the running chain).
struct ParentLease {
    disk: Vhdx,
    /// The running chain's read-only layer of the same file, whose shared lock we took over.
    old: Arc<Layer>,
}

impl ParentLease {
    /// Opens `old`'s file read-write, taking its lock over without a gap (see module doc).
    fn acquire(chain: &Chain) -> Result<ParentLease, VhdxError> {
        let old = chain[1].clone();
        let path = old.path.clone();
        let file = File::options().read(true).write(true).open(&path)?;
        vireo_block::lock(&file, &path, LockKind::Shared)?;
        vireo_block::unlock(old.io.file())?;
        // Same open file description: keeps the lock alive if `from_file` fails and drops `file`.
        let keep = file.try_clone()?;
        let give_back =
            |e: VhdxError| -> VhdxError { Self::hand_back(&keep, &old).err().unwrap_or(e) };
        if let Err(e) = vireo_block::lock(&file, &path, LockKind::Exclusive) {
            return Err(give_back(e.into()));
        }
        let opts = LayerOptions {
            read_only: false,
            lock: None,
            replay: ReadOnlyReplay::InMemory,
            fault: chain[0].fault.clone(),
        };
        let layer = match Layer::from_file(file, &path, &opts) {
            Ok(l) => l,
            Err(e) => return Err(give_back(e)),
        };
        let mut layers = vec![Arc::new(layer)];
        layers.extend(chain[2..].iter().cloned());
        Ok(ParentLease {
            disk: Vhdx::from_layers(layers, false),
            old,
        })
    }

    /// Gives the running chain's layer its shared lock back: our descriptor first downgrades to
    /// a read lock (still keeping writers out), then the old one locks, then ours may close.
    fn hand_back(ours: &File, old: &Layer) -> Result<(), VhdxError> {
        vireo_block::downgrade_for_handover(ours)?;
        vireo_block::lock(old.io.file(), &old.path, LockKind::Shared)?;
        Ok(())
    }

    /// Ends the merge without a pivot: the parent flushed and closed clean, the chain's lock
    /// restored. The child stays the top and opens against the parent's new DataWriteGuid.
    fn release(self) -> Result<(), VhdxError> {
        let top = self.disk.top();
        let flushed = top.close_clean();
        let handed = Self::hand_back(top.io.file(), &self.old);
        drop(top);
        drop(self.disk);
        flushed.and(handed)
    }
}

impl Vhdx {
    /// Merges the top (differencing) file into its parent while other threads keep reading and
    /// writing through this same `Vhdx`. Afterwards this disk *is* the parent ([`Vhdx::path`]
    /// returns the parent's path, writes go to it) and the child file is deleted. Returns the
    /// new top path.
    ///
    /// `progress(done, total)` counts bytes of the disk examined and copied: `total` starts at
    /// the virtual size and grows when ranges written meanwhile must be copied again. Setting `cancel` stops with [`VhdxError::Cancelled`]:
    /// I/O continues on the child, both files are valid, and a later `merge_live` (or the
    /// offline [`Vhdx::merge_into_parent`]) resumes. I/O pauses only at the very end.
    ///
    /// Errors: [`VhdxError::NotDifferencing`], [`VhdxError::ReadOnly`], [`VhdxError::Locked`]
    /// when another open shares the parent, [`VhdxError::Unsupported`] while another live merge
    /// of this disk runs. An error after the pivot (only: the child's deletion could not be made
    /// durable) leaves the disk merged; [`Vhdx::path`] tells which file is in use.
    pub fn merge_live(
        &self,
        progress: &dyn Fn(u64, u64),
        cancel: &AtomicBool,
    ) -> Result<PathBuf, VhdxError> {
        if self.read_only {
            return Err(VhdxError::ReadOnly);
        }
        let chain = self.chain();
        if !chain.top().params.has_parent || chain.len() < 2 {
            return Err(VhdxError::NotDifferencing(chain.top().path.clone()));
        }
        if self.dirty.claimed.swap(true, Ordering::AcqRel) {
            return Err(VhdxError::Unsupported(
                "another live merge of this disk is running",
            ));
        }
        let r = self.merge_live_claimed(chain, progress, cancel);
        self.dirty.claimed.store(false, Ordering::Release);
        r
    }

    fn merge_live_claimed(
        &self,
        chain: Arc<Chain>,
        progress: &dyn Fn(u64, u64),
        cancel: &AtomicBool,
    ) -> Result<PathBuf, VhdxError> {
        let child = chain[0].clone();
        let recorded = child
            .state
            .lock()
            .meta
            .item(MERGE_IN_PROGRESS)
            .filter(|b| b.len() == 16)
            .map(Guid::from_slice);
        let target = match recorded {
            Some(g) => g,
            None => {
                let g = Guid::random();
                // Durable (logged and flushed) before the parent changes at all.
                child.set_metadata_item(MERGE_IN_PROGRESS, FLAG_USER, Some(&g.0))?;
                g
            }
        };
        let lease = ParentLease::acquire(&chain)?;
        match self.copy_and_pivot(&chain, &lease, target, progress, cancel) {
            Ok(()) => {
                let path = lease.disk.path();
                drop(lease);
                Ok(path)
            }
            Err(Pivoted(e)) => Err(e),
            Err(NotPivoted(e)) => {
                self.stop_tracking();
                Err(lease.release().err().unwrap_or(e))
            }
        }
    }

    fn stop_tracking(&self) {
        let _g = self.chain.write();
        self.dirty.stop();
    }

    fn copy_and_pivot(
        &self,
        chain: &Arc<Chain>,
        lease: &ParentLease,
        target: Guid,
        progress: &dyn Fn(u64, u64),
        cancel: &AtomicBool,
    ) -> Result<(), Outcome> {
        let p = &lease.disk;
        let old_guid = lease.old.header().data_write_guid;
        let found = p.top().header().data_write_guid;
        if found != old_guid && found != target {
            return Err(NotPivoted(VhdxError::ParentLinkageMismatch {
                child: chain.top().path.clone(),
                parent: lease.old.path.clone(),
                expected: old_guid.to_string(),
                found,
            }));
        }
        p.top().begin_session(DataGuid::Set(target))?;
        let (vs, unit) = {
            let g = self.chain.write();
            if !Arc::ptr_eq(g.current(), chain) {
                return Err(NotPivoted(VhdxError::Unsupported(
                    "the disk changed while the merge started",
                )));
            }
            let vs = chain.virtual_size();
            let bs = chain.top().geo.block_size;
            let unit = vs
                .div_ceil(MAX_UNITS)
                .next_power_of_two()
                .clamp(MIN_UNIT, bs);
            self.dirty.start(vs, unit);
            (vs, unit)
        };
        // The merged disk is what the child showed, size included: a child that was grown or
        // (with force) shrunk carries its size into the parent. Shrinking the parent only drops
        // what the child cannot see, so the child's view stays the same at every instant.
        if vs != p.virtual_size() {
            p.resize(vs, true)?;
        }
        let mut buf = vec![0u8; MIB as usize];
        let units = vs.div_ceil(unit);
        let (mut done, mut total) = (0u64, vs);
        let bs = chain.top().geo.block_size;
        for b in 0..chain.top().geo.payload_blocks(vs) {
            if cancel.load(Ordering::Relaxed) {
                return Err(NotPivoted(VhdxError::Cancelled));
            }
            let (first, last) = (b * bs / unit, ((b + 1) * bs / unit).min(units));
            for u in first..last {
                self.dirty.take(u);
            }
            let end = ((b + 1) * bs).min(vs);
            copy(chain, p, chain.block_data(b)?, b * bs, end, &mut buf)?;
            done += end - b * bs;
            progress(done, total);
        }
        let small = (PIVOT_BYTES / unit).min(units / 16);
        for _ in 0..MAX_PASSES {
            let dirty = self.dirty.dirty_units();
            if dirty.len() as u64 <= small {
                break;
            }
            total += dirty.len() as u64 * unit;
            for u in dirty {
                if cancel.load(Ordering::Relaxed) {
                    return Err(NotPivoted(VhdxError::Cancelled));
                }
                if self.dirty.take(u) {
                    copy_unit(chain, p, u, unit, &mut buf)?;
                }
                done += unit;
                progress(done, total);
            }
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(NotPivoted(VhdxError::Cancelled));
        }
        // Write back what was copied so far while I/O still runs: the flush inside the pause
        // then only covers its last few units.
        p.flush()?;
        let last = self.pivot(chain, p, unit, &mut buf)?;
        total += last * unit;
        progress(total, total);
        Ok(())
    }

    /// Pauses I/O, copies what is still dirty, makes the parent durable, deletes the child and
    /// swaps the chain. Returns how many units the pause copied.
    fn pivot(
        &self,
        chain: &Arc<Chain>,
        p: &Vhdx,
        unit: u64,
        buf: &mut [u8],
    ) -> Result<u64, Outcome> {
        let mut g = self.chain.write();
        let dirty = self.dirty.dirty_units();
        for &u in &dirty {
            if self.dirty.take(u) {
                copy_unit(chain, p, u, unit, buf)?;
            }
        }
        p.flush()?;
        let child = chain.top();
        if child.fault.as_ref().is_some_and(|f| f.fired()) {
            // A simulated crash already happened: nothing after it may reach the disk.
            return Err(NotPivoted(VhdxError::InjectedFault));
        }
        // Until the child is gone for good, the parent may receive no write of its own.
        std::fs::remove_file(&child.path).map_err(VhdxError::from)?;
        // The child's file is gone; its open layer must not write to the orphan on close.
        child.abandoned.store(true, Ordering::Release);
        let synced = sync_dir(&child.path);
        g.replace(p.chain());
        self.dirty.stop();
        drop(g);
        synced.map_err(|e| Pivoted(e.into()))?;
        Ok(dirty.len() as u64)
    }
}

/// Whether a failed merge already switched the disk to the parent.
enum Outcome {
    NotPivoted(VhdxError),
    Pivoted(VhdxError),
}
use Outcome::{NotPivoted, Pivoted};

impl From<VhdxError> for Outcome {
    fn from(e: VhdxError) -> Outcome {
        NotPivoted(e)
    }
}

/// Copies what the child holds in `start..end` (inside one block) into the parent.
fn copy(
    chain: &Chain,
    p: &Vhdx,
    data: BlockData,
    start: u64,
    end: u64,
    buf: &mut [u8],
) -> Result<(), VhdxError> {
    match data {
        BlockData::None => {}
        BlockData::Zero => {
            let end = end.min(p.virtual_size());
            if start < end {
                p.discard(start, end - start)?;
            }
        }
        BlockData::Runs(runs) => {
            for (off, len) in runs {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    chain.read(&mut buf[..n], off + done)?;
                    p.write(&buf[..n], off + done)?;
                    done += n as u64;
                }
            }
        }
    }
    Ok(())
}

fn copy_unit(chain: &Chain, p: &Vhdx, u: u64, unit: u64, buf: &mut [u8]) -> Result<(), VhdxError> {
    let (start, end) = (u * unit, ((u + 1) * unit).min(chain.virtual_size()));
    copy(chain, p, chain.range_data(start, end)?, start, end, buf)
}

/// Makes a deletion in `path`'s directory durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}
