//! The backend every disk of a worker is served through: a switchable indirection over the
//! real image, plus write tracking while a storage move copies it (`move_storage/engine.rs`).
//!
//! Locking: `inner` is held shared by every guest request for its whole duration; the move
//! takes it exclusively only for the final step (copy the last dirty chunks, flush, swap), so
//! taking the write lock is the "disk parked at a request boundary" point: the virtio-blk
//! thread waits on it, the vCPUs run on. `dirty` is taken after `inner`, never the other way.
//!
//! Why a dirty bitmap and not a synchronous mirror: a write is marked *after* it reached the
//! source; the copier clears a chunk's bit *before* it reads the chunk from the source. So a
//! write whose mark the copier cleared was already in the source when the copier read it, and
//! a write marked later is copied again in the next pass. Guest writes never wait for the
//! destination, and a destination that fails (full) fails only the move, never the guest.

use std::path::PathBuf;
use std::sync::{Arc, RwLock, RwLockWriteGuard};

use parking_lot::Mutex;
use vireo_block::{BlockBackend, BlockError};

use crate::image::Image;

/// Dirty chunks of a disk, one bit per `chunk` bytes.
pub struct DirtyMap {
    chunk: u64,
    bits: Vec<u64>,
    count: usize,
}

impl DirtyMap {
    pub fn new(size: u64, chunk: u64) -> DirtyMap {
        let chunks = size.div_ceil(chunk) as usize;
        DirtyMap {
            chunk,
            bits: vec![0; chunks.div_ceil(64)],
            count: 0,
        }
    }

    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// Marks every chunk `offset..offset+len` touches (nothing for `len == 0`).
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.chunk;
        let last = (offset + len - 1) / self.chunk;
        for c in first..=last {
            let (w, b) = ((c / 64) as usize, c % 64);
            let Some(word) = self.bits.get_mut(w) else {
                return;
            };
            if *word & (1 << b) == 0 {
                *word |= 1 << b;
                self.count += 1;
            }
        }
    }

    /// Dirty chunks now.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The dirty chunk indices, in order; the map is clean afterwards.
    pub fn take(&mut self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.count);
        for (w, word) in self.bits.iter_mut().enumerate() {
            let mut v = std::mem::take(word);
            while v != 0 {
                let b = v.trailing_zeros() as u64;
                out.push(w as u64 * 64 + b);
                v &= v - 1;
            }
        }
        self.count = 0;
        out
    }
}

/// A disk as the VM's device sees it: the current image, switchable in one step.
pub struct MovableBackend {
    inner: RwLock<Arc<dyn BlockBackend>>,
    /// The image behind `inner`, by format (what a move copies from).
    image: Mutex<(PathBuf, Image)>,
    dirty: Mutex<Option<DirtyMap>>,
}

impl MovableBackend {
    pub fn new(inner: Arc<dyn BlockBackend>, path: PathBuf, image: Image) -> MovableBackend {
        MovableBackend {
            inner: RwLock::new(inner),
            image: Mutex::new((path, image)),
            dirty: Mutex::new(None),
        }
    }

    fn current(&self) -> std::sync::RwLockReadGuard<'_, Arc<dyn BlockBackend>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The image and its path as the VM uses them now.
    pub fn image(&self) -> (PathBuf, Image) {
        self.image.lock().clone()
    }

    /// The backend the VM does I/O through now (for the copier's reads).
    pub fn source(&self) -> Arc<dyn BlockBackend> {
        self.current().clone()
    }

    /// Starts marking guest writes (from now on, every write is seen).
    pub fn track(&self, chunk: u64) {
        *self.dirty.lock() = Some(DirtyMap::new(self.size(), chunk));
    }

    /// Stops marking (a cancelled or finished move).
    pub fn untrack(&self) {
        *self.dirty.lock() = None;
    }

    /// Dirty chunks now (0 when not tracking).
    pub fn dirty_count(&self) -> usize {
        self.dirty.lock().as_ref().map_or(0, DirtyMap::count)
    }

    /// Takes the dirty chunk list, clearing it (before the copier reads them).
    pub fn take_dirty(&self) -> Vec<u64> {
        self.dirty
            .lock()
            .as_mut()
            .map(DirtyMap::take)
            .unwrap_or_default()
    }

    fn mark(&self, offset: u64, len: u64) {
        if let Some(d) = self.dirty.lock().as_mut() {
            d.mark(offset, len);
        }
    }

    /// Holds every guest request off until the guard is dropped or passed to [`Self::switch`].
    pub fn park(&self) -> Parked<'_> {
        Parked {
            owner: self,
            guard: self.inner.write().unwrap_or_else(|p| p.into_inner()),
        }
    }
}

/// The disk with no request running: the final copy and the switch happen under this.
pub struct Parked<'a> {
    owner: &'a MovableBackend,
    guard: RwLockWriteGuard<'a, Arc<dyn BlockBackend>>,
}

impl Parked<'_> {
    pub fn source(&self) -> &Arc<dyn BlockBackend> {
        &self.guard
    }

    /// Dirty chunks, cleared (no write can come in meanwhile).
    pub fn take_dirty(&self) -> Vec<u64> {
        self.owner.take_dirty()
    }

    /// Puts `new` in place of the current image and keeps the disk parked; returns the old
    /// backend (the old image reference kept here goes at once). A checkpoint swaps in steps
    /// under one park: the old file must be closed before its child can be opened.
    pub fn replace(
        &mut self,
        new: Arc<dyn BlockBackend>,
        path: PathBuf,
        image: Image,
    ) -> Arc<dyn BlockBackend> {
        *self.owner.image.lock() = (path, image);
        std::mem::replace(&mut *self.guard, new)
    }

    /// Puts `new` in place of the current image and stops tracking; returns the old backend.
    /// Requests resume (on `new`) when the parked guard goes.
    pub fn switch(
        mut self,
        new: Arc<dyn BlockBackend>,
        path: PathBuf,
        image: Image,
    ) -> Arc<dyn BlockBackend> {
        self.owner.untrack();
        *self.owner.image.lock() = (path, image);
        std::mem::replace(&mut *self.guard, new)
    }
}

impl BlockBackend for MovableBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        self.current().read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        let inner = self.current();
        inner.write_at(buf, offset)?;
        // After the write: see the module header for why this order is safe.
        self.mark(offset, buf.len() as u64);
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.current().flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let inner = self.current();
        inner.discard(offset, len)?;
        self.mark(offset, len);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let inner = self.current();
        inner.write_zeroes(offset, len)?;
        self.mark(offset, len);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.current().size()
    }

    fn resize(&self, new_size: u64) -> Result<(), BlockError> {
        let inner = self.current();
        if self.dirty.lock().is_some() {
            return Err(BlockError::Refused(
                "a storage move of this disk is running; resize it after the move".into(),
            ));
        }
        inner.resize(new_size)
    }

    fn read_only(&self) -> bool {
        self.current().read_only()
    }

    fn logical_sector_size(&self) -> u32 {
        self.current().logical_sector_size()
    }

    fn physical_sector_size(&self) -> u32 {
        self.current().physical_sector_size()
    }

    fn id(&self) -> String {
        self.current().id()
    }

    fn dup_locked_file(&self) -> Option<std::io::Result<std::fs::File>> {
        self.current().dup_locked_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_touched_chunk_once_and_take_clears() {
        let mut d = DirtyMap::new(10 << 20, 1 << 20);
        d.mark(0, 1);
        d.mark(512, 512);
        assert_eq!(d.count(), 1);
        d.mark((1 << 20) - 1, 2); // straddles chunks 0 and 1
        d.mark(9 << 20, 1 << 20);
        d.mark(5 << 20, 0);
        assert_eq!(d.count(), 3);
        assert_eq!(d.take(), vec![0, 1, 9]);
        assert_eq!(d.count(), 0);
        assert!(d.take().is_empty());
        // Past the end is ignored, not a panic.
        d.mark(100 << 20, 4096);
        assert_eq!(d.count(), 0);
    }

    #[test]
    fn many_chunks_across_words() {
        let mut d = DirtyMap::new(1 << 30, 4096);
        for c in (0..(1u64 << 18)).step_by(63) {
            d.mark(c * 4096 + 7, 1);
        }
        let got = d.take();
        let want: Vec<u64> = (0..(1u64 << 18)).step_by(63).collect();
        assert_eq!(got, want);
    }
}
