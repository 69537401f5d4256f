//! [`Vhdx`]: an open disk (a chain of layers, top first) and its I/O paths.

use std::collections::HashSet;
use std::fs::{self, File};
use std::ops::Deref;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::RwLockReadGuard;

use crate::fileio::FaultInjector;
use crate::format::bat;
use crate::format::*;
use crate::gate::Gate;
use crate::guid::Guid;
use crate::layer::{DataGuid, Layer, LayerOptions, ReadOnlyReplay, PAGE};
use crate::ops::live_merge::DirtyTracker;
use crate::VhdxError;
use vireo_block::LockKind;

mod shrink;

/// Deepest differencing chain we follow before assuming something is wrong.
pub const MAX_CHAIN_DEPTH: usize = 256;

/// How to open a disk.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Open O_RDONLY and refuse writes. Parents are always opened read-only.
    pub read_only: bool,
    /// What to do when a read-only open meets a non-empty log.
    pub replay: ReadOnlyReplay,
    /// Take no file lock (normally read-write opens lock the file exclusively, read-only opens
    /// and parents share it). Only for tools that must look at a file another process has
    /// open: what they read may be metadata in the middle of an update.
    pub no_lock: bool,
    /// Test hook: simulate a crash after this many mutating file operations on the top file.
    #[doc(hidden)]
    pub fault: Option<Arc<FaultInjector>>,
}

impl OpenOptions {
    pub fn read_only() -> OpenOptions {
        OpenOptions {
            read_only: true,
            ..Default::default()
        }
    }
}

/// An open VHDX disk: the file itself plus, for differencing disks, its read-only parents.
///
/// `Send + Sync`; all I/O methods take `&self` and may run from many threads at once.
pub struct Vhdx {
    /// The layers I/O runs against. Every I/O holds this lock shared for its whole duration
    /// (one read-lock of a per-thread shard); only a live merge takes it exclusively, to drain
    /// I/O and swap in the parent's chain (see `ops::live_merge`).
    pub(crate) chain: Gate<Arc<Chain>>,
    pub(crate) read_only: bool,
    /// Blocks written while a live merge copies; idle (one relaxed load per write) otherwise.
    pub(crate) dirty: DirtyTracker,
}

/// The files of a disk, top first, and the I/O paths that run against them.
pub(crate) struct Chain {
    pub layers: Vec<Arc<Layer>>,
    pub read_only: bool,
}

impl Deref for Chain {
    type Target = [Arc<Layer>];
    fn deref(&self) -> &[Arc<Layer>] {
        &self.layers
    }
}

impl std::fmt::Debug for Vhdx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.chain();
        f.debug_struct("Vhdx")
            .field("path", &c[0].path)
            .field("depth", &c.len())
            .finish()
    }
}

/// Turns a locator path (possibly Windows style) into a local path relative to `dir`.
fn locator_candidates(child: &Path, loc: &locator::ParentLocator) -> Vec<PathBuf> {
    let dir = child.parent().unwrap_or(Path::new("."));
    let mut out = vec![];
    for key in ["relative_path", "volume_path", "absolute_win32_path"] {
        if let Some(v) = loc.get(key) {
            let unix = v.replace('\\', "/");
            let p = Path::new(&unix);
            out.push(if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            });
            if unix != v {
                out.push(if Path::new(v).is_absolute() {
                    PathBuf::from(v)
                } else {
                    dir.join(v)
                });
            }
        }
    }
    out
}

impl Vhdx {
    /// Opens `path` and, for a differencing disk, its whole parent chain.
    ///
    /// Locks (unless `no_lock`): exclusive on `path` when read-write, shared when read-only,
    /// shared on every parent; a conflicting open elsewhere gives [`VhdxError::Locked`].
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Vhdx, VhdxError> {
        Self::open_chain(path, opts, false)
    }

    /// [`Vhdx::open`] with `file` as the top file: the already open (and normally already
    /// locked) file `path` names, a disk handed over with its lock (`vireo_block::handover`).
    /// Its lock is taken again unless `no_lock` (a no-op when it holds it already); parents
    /// are opened by path as usual.
    pub fn open_file(file: File, path: &Path, opts: &OpenOptions) -> Result<Vhdx, VhdxError> {
        Self::open_chain_from(path, Some(file), opts, false)
    }

    /// [`Vhdx::open`]; with `unlocked_parent` the direct parent is opened without a lock
    /// because the caller (merge) is about to lock it exclusively itself.
    pub(crate) fn open_chain(
        path: &Path,
        opts: &OpenOptions,
        unlocked_parent: bool,
    ) -> Result<Vhdx, VhdxError> {
        Self::open_chain_from(path, None, opts, unlocked_parent)
    }

    fn open_chain_from(
        path: &Path,
        top_file: Option<File>,
        opts: &OpenOptions,
        unlocked_parent: bool,
    ) -> Result<Vhdx, VhdxError> {
        let top_lock = match (opts.no_lock, opts.read_only) {
            (true, _) => None,
            (false, true) => Some(LockKind::Shared),
            (false, false) => Some(LockKind::Exclusive),
        };
        let top_opts = LayerOptions {
            read_only: opts.read_only,
            lock: top_lock,
            replay: opts.replay,
            fault: opts.fault.clone(),
        };
        let top = Arc::new(match top_file {
            None => Layer::open(path, &top_opts)?,
            Some(file) => {
                if let Some(kind) = top_lock {
                    vireo_block::lock(&file, path, kind)?;
                }
                Layer::from_file(file, path, &top_opts)?
            }
        });
        let mut seen = HashSet::new();
        let meta = fs::metadata(path)?;
        seen.insert((meta.dev(), meta.ino()));
        let mut chain = vec![top];
        loop {
            let child = chain.last().unwrap().clone();
            let Some(loc) = child.params.parent_locator.clone() else {
                break;
            };
            if chain.len() >= MAX_CHAIN_DEPTH {
                return Err(VhdxError::ChainTooDeep(MAX_CHAIN_DEPTH));
            }
            let candidates = locator_candidates(&child.path, &loc);
            let Some(ppath) = candidates.iter().find(|p| p.is_file()).cloned() else {
                return Err(VhdxError::ParentNotFound {
                    child: child.path.clone(),
                    tried: candidates.iter().map(|p| p.display().to_string()).collect(),
                });
            };
            let pm = fs::metadata(&ppath)?;
            if !seen.insert((pm.dev(), pm.ino())) {
                return Err(VhdxError::ParentLoop(ppath));
            }
            let skip = opts.no_lock || (unlocked_parent && chain.len() == 1);
            let parent = Layer::open(
                &ppath,
                &LayerOptions {
                    read_only: true,
                    lock: (!skip).then_some(LockKind::Shared),
                    replay: ReadOnlyReplay::InMemory,
                    fault: None,
                },
            )?;
            let found = parent.header().data_write_guid;
            let linkage = loc.get("parent_linkage").unwrap_or_default().to_string();
            let ok = Guid::parse(&linkage) == Some(found)
                || loc.get("parent_linkage2").and_then(Guid::parse) == Some(found)
                || child.merge_target == Some(found);
            if !ok {
                return Err(VhdxError::ParentLinkageMismatch {
                    child: child.path.clone(),
                    parent: ppath,
                    expected: linkage,
                    found,
                });
            }
            if parent.params.logical_sector != child.params.logical_sector {
                return Err(VhdxError::ParentSectorMismatch {
                    child: child.path.clone(),
                    parent: ppath,
                    child_sector: child.params.logical_sector,
                    parent_sector: parent.params.logical_sector,
                });
            }
            chain.push(Arc::new(parent));
        }
        Ok(Vhdx::from_layers(chain, opts.read_only))
    }

    pub(crate) fn from_layers(layers: Vec<Arc<Layer>>, read_only: bool) -> Vhdx {
        Vhdx {
            chain: Gate::new(Arc::new(Chain { layers, read_only })),
            read_only,
            dirty: DirtyTracker::default(),
        }
    }

    /// Test hook: closes the files (releasing their locks) without the clean close, leaving
    /// them exactly as a process killed at this point would: the log still live, nothing
    /// flushed that was not flushed already.
    #[doc(hidden)]
    pub fn abandon(self) {
        for l in self.chain().iter() {
            l.abandoned.store(true, Ordering::Release);
        }
    }

    /// The current chain, held shared for the duration of one I/O (see `Vhdx.chain`).
    pub(crate) fn io(&self) -> RwLockReadGuard<'_, Arc<Chain>> {
        self.chain.read()
    }

    /// A snapshot of the current chain, for callers that do no payload I/O.
    pub(crate) fn chain(&self) -> Arc<Chain> {
        self.io().clone()
    }

    pub(crate) fn top(&self) -> Arc<Layer> {
        self.io()[0].clone()
    }

    /// Whether streams of large writes start write-back of the file as they go (on by
    /// default; `Layer::wrote`). That suits a writer that flushes at the end (tools, a copy):
    /// the device works during the stream instead of all at the flush. A guest's disk turns it
    /// off, as QEMU and our raw files have it: the guest decides when to flush, and a stream
    /// that rewrites cached pages otherwise competes with write-back of the very pages it is
    /// rewriting (measured with the probe guest, 1 MiB writes at QD 4 on a 256 MiB VHDX, load
    /// ~14, four alternating rounds: 942–1,945 MiB/s with it, 1,715–4,101 without,
    /// docs/datapath.md). Applies to the current top file (a live merge's new top has it on).
    pub fn set_early_writeback(&self, on: bool) {
        self.top().early_writeback.store(on, Ordering::Relaxed);
    }

    /// Every file of the chain, the top file first, then its parent, and so on (what a storage
    /// move copies).
    pub fn chain_paths(&self) -> Vec<PathBuf> {
        self.chain().iter().map(|l| l.path.clone()).collect()
    }

    /// The top file (after a live merge, the parent it was merged into).
    pub fn path(&self) -> PathBuf {
        self.top().path.clone()
    }

    pub fn virtual_size(&self) -> u64 {
        self.top().vsize()
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn block_size(&self) -> u32 {
        self.top().params.block_size
    }

    pub fn logical_sector_size(&self) -> u32 {
        self.top().params.logical_sector
    }

    pub fn physical_sector_size(&self) -> u32 {
        self.top().params.physical_sector
    }

    /// Number of files in the chain (1 for fixed/dynamic).
    pub fn chain_depth(&self) -> usize {
        self.io().len()
    }

    /// Reads `buf.len()` bytes at virtual `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), VhdxError> {
        self.io().read(buf, offset)
    }

    /// Writes `buf` at virtual `offset`. Durable after [`Vhdx::flush`].
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<(), VhdxError> {
        let c = self.io();
        let r = c.write(buf, offset);
        // Marked after the write (even a failed one) and before the chain is released, so a
        // live merge either copies the block later or is already past its pivot.
        self.dirty.mark(offset, buf.len() as u64);
        r
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), VhdxError> {
        self.io().flush()
    }

    /// The range no longer holds data; it reads as zeroes afterwards. Whole blocks become
    /// UNMAPPED (ZERO in differencing disks, which must hide the parent); partial ranges are
    /// zeroed in place.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), VhdxError> {
        let c = self.io();
        let r = c.discard(offset, len);
        self.dirty.mark(offset, len);
        r
    }

    /// Virtual ranges `(offset, length)` that may hold data anywhere in the chain, merged and in
    /// order, at block granularity. Everything else reads as zero.
    pub fn allocated_ranges(&self) -> Vec<(u64, u64)> {
        self.io().allocated_ranges()
    }

    /// Changes the virtual size. Shrinking over allocated data is refused unless `force`.
    /// Refused while a live merge runs (the merge sized the parent for the child).
    pub fn resize(&self, new_size: u64, force: bool) -> Result<(), VhdxError> {
        let c = self.io();
        if self.dirty.is_active() {
            return Err(VhdxError::Unsupported("resizing while a live merge runs"));
        }
        c.resize(new_size, force)
    }
}

impl Chain {
    pub(crate) fn top(&self) -> &Layer {
        &self.layers[0]
    }

    pub fn virtual_size(&self) -> u64 {
        self.top().vsize()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), VhdxError> {
        let size = self.virtual_size();
        match offset.checked_add(len) {
            Some(e) if e <= size => Ok(()),
            _ => Err(VhdxError::OutOfRange { offset, len, size }),
        }
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), VhdxError> {
        self.check_range(offset, buf.len() as u64)?;
        self.read_layer(0, buf, offset)
    }

    fn read_layer(&self, idx: usize, buf: &mut [u8], offset: u64) -> Result<(), VhdxError> {
        let Some(l) = self.layers.get(idx) else {
            buf.fill(0);
            return Ok(());
        };
        let vs = l.vsize();
        let inside = vs.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        let bs = l.geo.block_size;
        let mut done = 0usize;
        while done < inside {
            let pos = offset + done as u64;
            let b = pos / bs;
            let inb = pos % bs;
            let n = ((bs - inb) as usize).min(inside - done);
            let seg = &mut buf[done..done + n];
            let _io = l.space.io_gate(); // until the read of the looked-up offset is done
            let e = l.bat.read().entries[l.geo.payload_index(b) as usize];
            match bat::state(e) {
                bat::FULLY_PRESENT => l.io.read_at(seg, bat::offset(e) + inb)?,
                bat::PARTIALLY_PRESENT => self.read_partial(idx, l, b, bat::offset(e), seg, pos)?,
                bat::NOT_PRESENT | bat::UNDEFINED if l.geo.differencing => {
                    self.read_layer(idx + 1, seg, pos)?
                }
                _ => seg.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Reads part of a partially present block: sectors whose bitmap bit is set come from this
    /// file, the rest from the parent.
    fn read_partial(
        &self,
        idx: usize,
        l: &Layer,
        block: u64,
        data_off: u64,
        buf: &mut [u8],
        pos: u64,
    ) -> Result<(), VhdxError> {
        let ls = l.geo.logical_sector;
        let sb = bat::offset(l.bat.read().entries[l.geo.bitmap_index(block) as usize]);
        let end = pos + buf.len() as u64;
        let block_start = block * l.geo.block_size;
        let mut p = pos;
        while p < end {
            let first = p / ls;
            let (bit, n) = self.bitmap_run(l, sb, first, end.div_ceil(ls))?;
            let run_end = ((first + n) * ls).min(end);
            let seg = &mut buf[(p - pos) as usize..(run_end - pos) as usize];
            if bit {
                l.io.read_at(seg, data_off + (p - block_start))?;
            } else {
                self.read_layer(idx + 1, seg, p)?;
            }
            p = run_end;
        }
        Ok(())
    }

    /// The bit of sector `first` and how many sectors from `first` (up to `limit`) share it,
    /// scanning a page at a time under one lock and whole bytes where possible.
    fn bitmap_run(
        &self,
        l: &Layer,
        sb: u64,
        first: u64,
        limit: u64,
    ) -> Result<(bool, u64), VhdxError> {
        let bit = self.bitmap_bit(l, sb, first)?;
        let same = if bit { 0xff } else { 0x00 };
        let mut s = first + 1;
        while s < limit {
            let (page, _, _) = l.bitmap_position(sb, s);
            l.bitmap_page_loaded(page)?;
            let bm = l.bitmaps.read();
            let data = &bm[&page];
            loop {
                if s >= limit {
                    return Ok((bit, s - first));
                }
                let (pg, byte, b) = l.bitmap_position(sb, s);
                if pg != page {
                    break;
                }
                if b == 0 && s + 8 <= limit && data[byte] == same {
                    s += 8;
                } else if (data[byte] >> b & 1 == 1) == bit {
                    s += 1;
                } else {
                    return Ok((bit, s - first));
                }
            }
        }
        Ok((bit, s.min(limit) - first))
    }

    pub(crate) fn bitmap_bit(&self, l: &Layer, sb: u64, sector: u64) -> Result<bool, VhdxError> {
        let (page, byte, bit) = l.bitmap_position(sb, sector);
        l.bitmap_page_loaded(page)?;
        let bm = l.bitmaps.read();
        Ok(bm[&page][byte] >> bit & 1 == 1)
    }

    fn set_bitmap_bits(&self, l: &Layer, block: u64, pos: u64, len: u64) -> Result<(), VhdxError> {
        let ls = l.geo.logical_sector;
        let sb = bat::offset(l.bat.read().entries[l.geo.bitmap_index(block) as usize]);
        let (first, last) = (pos / ls, (pos + len).div_ceil(ls));
        let mut s = first;
        while s < last {
            let (page, _, _) = l.bitmap_position(sb, s);
            l.bitmap_page_loaded(page)?;
            let mut bm = l.bitmaps.write();
            let p = bm.get_mut(&page).unwrap();
            while s < last {
                let (pg, byte, bit) = l.bitmap_position(sb, s);
                if pg != page {
                    break;
                }
                if bit == 0 && s + 8 <= last {
                    p[byte] = 0xff;
                    s += 8;
                } else {
                    p[byte] |= 1 << bit;
                    s += 1;
                }
            }
            l.dirty.lock().bitmap_pages.insert(page);
        }
        Ok(())
    }

    pub fn write(&self, buf: &[u8], offset: u64) -> Result<(), VhdxError> {
        if self.read_only {
            return Err(VhdxError::ReadOnly);
        }
        self.check_range(offset, buf.len() as u64)?;
        let l = self.top();
        l.begin_session(DataGuid::New)?;
        let ls = l.geo.logical_sector;
        if l.geo.differencing
            && (!offset.is_multiple_of(ls) || !(buf.len() as u64).is_multiple_of(ls))
        {
            // Bitmaps track whole sectors: widen to sector boundaries with the current contents.
            let start = offset / ls * ls;
            let end = (offset + buf.len() as u64).div_ceil(ls) * ls;
            let mut wide = vec![0u8; (end - start) as usize];
            self.read(&mut wide, start)?;
            wide[(offset - start) as usize..(offset - start) as usize + buf.len()]
                .copy_from_slice(buf);
            return self.write_aligned(&wide, start);
        }
        self.write_aligned(buf, offset)
    }

    fn write_aligned(&self, buf: &[u8], offset: u64) -> Result<(), VhdxError> {
        let l = self.top();
        let bs = l.geo.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = pos / bs;
            let inb = pos % bs;
            let n = ((bs - inb) as usize).min(buf.len() - done);
            let seg = &buf[done..done + n];
            let pi = l.geo.payload_index(b) as usize;
            loop {
                let io = l.space.io_gate(); // until the write to the looked-up offset is done
                let e = l.bat.read().entries[pi];
                match bat::state(e) {
                    bat::FULLY_PRESENT => {
                        l.reserve(bat::offset(e), bat::offset(e) + inb, n as u64);
                        l.io.write_at(seg, bat::offset(e) + inb)?;
                        drop(io);
                        l.wrote(n as u64);
                        break;
                    }
                    bat::PARTIALLY_PRESENT => {
                        l.reserve(bat::offset(e), bat::offset(e) + inb, n as u64);
                        l.io.write_at(seg, bat::offset(e) + inb)?;
                        drop(io);
                        l.wrote(n as u64);
                        self.set_bitmap_bits(l, b, pos, n as u64)?;
                        break;
                    }
                    _ => {
                        drop(io);
                        self.allocate_block(l, b, e)?
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Gives payload block `block` space: freed space when some is reusable, else at the end
    /// of the file. The new space reads as zero (zeroed reused space or sparse extension), which
    /// is exactly the old contents for every non-parent state, so the entry can be published
    /// before the data lands.
    fn allocate_block(&self, l: &Layer, block: u64, seen: u64) -> Result<(), VhdxError> {
        let mut end = l.alloc.lock();
        let pi = l.geo.payload_index(block);
        if l.bat.read().entries[pi as usize] != seen {
            return Ok(());
        }
        let bs = l.geo.block_size;
        let inherits =
            l.geo.differencing && matches!(bat::state(seen), bat::NOT_PRESENT | bat::UNDEFINED);
        let mut sb_new = None;
        if inherits {
            let si = l.geo.bitmap_index(block);
            if bat::state(l.bat.read().entries[si as usize]) != bat::SB_PRESENT {
                sb_new = Some((si, l.claim_space(&mut end, SECTOR_BITMAP_BLOCK)?));
            }
        }
        let off = match l.claim_space(&mut end, bs) {
            Ok(off) => off,
            Err(e) => {
                if let Some((_, so)) = sb_new {
                    l.space.give_back(so, SECTOR_BITMAP_BLOCK);
                }
                return Err(e);
            }
        };
        let mut bat_w = l.bat.write();
        if let Some((si, so)) = sb_new {
            bat_w.entries[si as usize] = bat::entry(bat::SB_PRESENT, so);
            l.mark_bat_dirty(si);
        }
        let state = if inherits {
            bat::PARTIALLY_PRESENT
        } else {
            bat::FULLY_PRESENT
        };
        bat_w.entries[pi as usize] = bat::entry(state, off);
        l.mark_bat_dirty(pi);
        Ok(())
    }

    pub fn flush(&self) -> Result<(), VhdxError> {
        self.top().flush_with(vec![])
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<(), VhdxError> {
        if self.read_only {
            return Err(VhdxError::ReadOnly);
        }
        self.check_range(offset, len)?;
        let l = self.top();
        l.begin_session(DataGuid::New)?;
        let ls = l.geo.logical_sector;
        // Partial sectors at either end are zeroed by writing (bitmaps track whole sectors).
        let (a, z) = (
            offset.next_multiple_of(ls).min(offset + len),
            ((offset + len) / ls * ls).max(offset),
        );
        if a > z {
            return self.write(&vec![0u8; len as usize], offset);
        }
        if a > offset {
            self.write(&vec![0u8; (a - offset) as usize], offset)?;
        }
        if offset + len > z {
            self.write(&vec![0u8; (offset + len - z) as usize], z)?;
        }
        let bs = l.geo.block_size;
        let vs = l.vsize();
        let mut pos = a;
        let end = z;
        while pos < end {
            let b = pos / bs;
            let inb = pos % bs;
            let n = (bs - inb).min(end - pos);
            let whole = inb == 0 && (n == bs || pos + n == vs);
            let pi = l.geo.payload_index(b);
            let io = l.space.io_gate(); // until the I/O to the looked-up offset is done
            let e = l.bat.read().entries[pi as usize];
            let s = bat::state(e);
            let present = matches!(s, bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT);
            if l.params.leave_blocks_allocated {
                if present {
                    l.io.zero_range(bat::offset(e) + inb, n)?;
                }
            } else if whole {
                // Not under the gate: `alloc` is taken below, resize takes `state` under
                // `alloc`, and a flush drains the gate under `state`. The old space needs no
                // gate: only the thread that changes the entry touches it before freeing it.
                drop(io);
                let target = if l.geo.differencing {
                    bat::ZERO
                } else {
                    bat::UNMAPPED
                };
                let already = s == target || (!l.geo.differencing && !present);
                if !already {
                    let changed = {
                        let _a = l.alloc.lock();
                        let mut w = l.bat.write();
                        let same = w.entries[pi as usize] == e;
                        if same {
                            w.entries[pi as usize] = bat::entry(target, 0);
                            l.mark_bat_dirty(pi);
                        }
                        same
                    };
                    // Only the thread that changed the entry owns the old space: free it in the
                    // filesystem, then hand it to the free list (reusable after a flush).
                    if present && changed {
                        let r = l.io.zero_range(bat::offset(e), bs);
                        l.space.freed(bat::offset(e), bs);
                        r?;
                    }
                }
            } else if present {
                l.io.zero_range(bat::offset(e) + inb, n)?;
                if s == bat::PARTIALLY_PRESENT {
                    self.set_bitmap_bits(l, b, pos, n)?;
                }
            } else if l.geo.differencing && matches!(s, bat::NOT_PRESENT | bat::UNDEFINED) {
                // `write` takes the gate itself. Only a zeroed range in this file can hide the
                // parent's data.
                drop(io);
                let zeroes = vec![0u8; n.min(MIB) as usize];
                let mut p = pos;
                while p < pos + n {
                    let k = (pos + n - p).min(zeroes.len() as u64);
                    self.write(&zeroes[..k as usize], p)?;
                    p += k;
                }
            }
            pos += n;
        }
        Ok(())
    }

    pub fn allocated_ranges(&self) -> Vec<(u64, u64)> {
        let vs = self.virtual_size();
        let mut out: Vec<(u64, u64)> = vec![];
        let mut push = |s: u64, e: u64| {
            let e = e.min(vs);
            if s >= e {
                return;
            }
            if let Some(last) = out.last_mut() {
                if last.0 + last.1 >= s {
                    last.1 = last.1.max(e - last.0);
                    return;
                }
            }
            out.push((s, e - s));
        };
        let mut spans = vec![];
        for (idx, l) in self.layers.iter().enumerate() {
            let bs = l.geo.block_size;
            let bat = l.bat.read();
            for b in 0..l.geo.payload_blocks(l.vsize().min(vs)) {
                let s = bat::state(bat.entries[l.geo.payload_index(b) as usize]);
                if matches!(s, bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT) {
                    spans.push((b * bs, (b + 1) * bs));
                }
            }
            // Lower layers are hidden wherever this layer says zero; ignoring that only
            // over-reports, which is harmless for callers that copy ranges.
            let _ = idx;
        }
        spans.sort_unstable();
        for (s, e) in spans {
            push(s, e);
        }
        out
    }

    pub fn resize(&self, new_size: u64, force: bool) -> Result<(), VhdxError> {
        if self.read_only {
            return Err(VhdxError::ReadOnly);
        }
        let l = self.top();
        let ls = l.geo.logical_sector;
        if new_size == 0 || !new_size.is_multiple_of(ls) || new_size > MAX_VIRTUAL_SIZE {
            return Err(VhdxError::BadVirtualSize(new_size));
        }
        let old = l.vsize();
        if new_size == old {
            return Ok(());
        }
        l.begin_session(DataGuid::New)?;
        let geo = l.geo;
        let bs = geo.block_size;
        if new_size < old {
            let keep = geo.payload_blocks(new_size);
            // The top's last kept block is judged by content (only its tail goes), the rest
            // by what any layer down the chain holds there: data in a parent is the disk's
            // data as much as data in the top file.
            let tail = new_size..(keep * bs).min(old);
            if !force {
                let mut buf = vec![0u8; (tail.end - tail.start) as usize];
                self.read(&mut buf, tail.start)?;
                let at = match buf.iter().position(|&x| x != 0) {
                    Some(i) => Some(tail.start + i as u64),
                    None => self.first_data_in(tail.end, old)?,
                };
                if let Some(data_at) = at {
                    return Err(VhdxError::ShrinkOverData { new_size, data_at });
                }
            }
            if !new_size.is_multiple_of(bs) {
                let e = l.bat.read().entries[geo.payload_index(keep - 1) as usize];
                if matches!(bat::state(e), bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT) {
                    l.io.zero_range(bat::offset(e) + new_size % bs, bs - new_size % bs)?;
                }
            }
            // Shrink the visible size first so no new I/O lands in the doomed range.
            l.vsize.store(new_size, Ordering::Release);
            {
                let _a = l.alloc.lock();
                let mut w = l.bat.write();
                let first = geo.payload_index(keep) as usize;
                let last = (geo.bat_entries(old) as usize).min(w.entries.len());
                for i in first..last {
                    let is_sb = geo.is_bitmap_index(i as u64);
                    let keep_sb = is_sb && (i as u64) < geo.bat_entries(new_size);
                    if w.entries[i] != 0 && !keep_sb {
                        let (s, off) = (bat::state(w.entries[i]), bat::offset(w.entries[i]));
                        w.entries[i] = 0;
                        l.mark_bat_dirty(i as u64);
                        // Reusable once the flush below commits the cleared entry. Dropped
                        // sector-bitmap blocks are not freed: that flush's log entry may carry
                        // their dirty pages, and replaying it would write them into reused space.
                        if !is_sb && matches!(s, bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT) {
                            l.space.freed(off, bs);
                        }
                    }
                }
            }
        } else {
            let need = geo.bat_entries(new_size);
            let old_need = geo.bat_entries(old);
            let mut end = l.alloc.lock();
            let region_len = l.bat.read().region_len;
            if need * 8 > region_len {
                // The BAT does not fit: write a larger copy at the end of the file, then switch
                // the region table to it. The old copy stays valid until the switch.
                let new_len = round_up(need * 8, ALIGN);
                let off = *end;
                l.io.set_len(off + new_len)?;
                *end += new_len;
                let mut entries = l.bat.read().entries.clone();
                entries.truncate(old_need as usize);
                entries.resize((round_up(need * 8, PAGE) / 8) as usize, 0);
                let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
                l.io.write_at(&raw, off)?;
                l.io.sync()?;
                let mut st = l.state.lock();
                let mut regions = st.regions.clone();
                for r in regions.entries.iter_mut().filter(|r| r.guid == BAT_REGION) {
                    r.file_offset = off;
                    r.length = new_len as u32;
                }
                l.write_region_table(&mut st, regions)?;
                let mut w = l.bat.write();
                // The region table switch is durable, so the old copy's space is unreferenced;
                // reusable after the flush below, whose log entry (the one a crash replays)
                // holds pages of the new copy only.
                l.space.freed(w.offset, w.region_len);
                w.entries = entries;
                w.offset = off;
                w.region_len = new_len;
            } else {
                let mut w = l.bat.write();
                let len = (round_up(need * 8, PAGE).min(region_len) / 8) as usize;
                if w.entries.len() < len {
                    w.entries.resize(len, 0);
                }
                // Entries past the old end may hold stale values on disk: clear and log them.
                for i in old_need as usize..need as usize {
                    w.entries[i] = 0;
                    l.mark_bat_dirty(i as u64);
                }
            }
            if geo.differencing {
                // Newly exposed space reads as zero, not as whatever the parent holds there.
                let mut w = l.bat.write();
                for b in geo.payload_blocks(old)..geo.payload_blocks(new_size) {
                    let pi = geo.payload_index(b);
                    w.entries[pi as usize] = bat::entry(bat::ZERO, 0);
                    l.mark_bat_dirty(pi);
                }
            }
            if l.params.leave_blocks_allocated {
                let mut w = l.bat.write();
                for b in geo.payload_blocks(old)..geo.payload_blocks(new_size) {
                    let pi = geo.payload_index(b);
                    let off = *end;
                    l.io.set_len(off + bs)?;
                    l.io.allocate(off, bs)?;
                    *end += bs;
                    w.entries[pi as usize] = bat::entry(bat::FULLY_PRESENT, off);
                    l.mark_bat_dirty(pi);
                }
            }
        }
        if geo.differencing && new_size > old && !old.is_multiple_of(bs) {
            let end = new_size.min(old.next_multiple_of(bs));
            self.write_aligned(&vec![0u8; (end - old) as usize], old)?;
        }
        let pages = {
            let mut st = l.state.lock();
            let range = st.meta.set_virtual_size(new_size)?;
            Layer::metadata_pages(&st, &[range])
        };
        l.flush_with(pages)?;
        l.vsize.store(new_size, Ordering::Release);
        Ok(())
    }
}

impl Vhdx {
    /// User metadata items (IsUser set) of the top file: (item GUID, value).
    pub fn user_metadata(&self) -> Vec<(Guid, Vec<u8>)> {
        let top = self.top();
        let st = top.state.lock();
        st.meta
            .entries
            .iter()
            .filter(|e| e.flags & crate::format::metadata::FLAG_USER != 0)
            .map(|e| {
                (
                    e.item_id,
                    st.meta.item(e.item_id).unwrap_or_default().to_vec(),
                )
            })
            .collect()
    }

    /// Adds or replaces a user metadata item (committed through the log), or removes it with
    /// `None`. Items this library does not know are always preserved.
    pub fn set_user_metadata(&self, id: Guid, value: Option<&[u8]>) -> Result<(), VhdxError> {
        if self.read_only {
            return Err(VhdxError::ReadOnly);
        }
        if value.is_some_and(|v| v.len() > MIB as usize) {
            return Err(VhdxError::MetadataFull(id));
        }
        self.top()
            .set_metadata_item(id, crate::format::metadata::FLAG_USER, value)
    }
}
