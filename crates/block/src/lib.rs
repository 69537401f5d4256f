//! Block storage as the VMM sees it: one [`BlockBackend`] trait that virtio-blk (and later
//! storage migration and replica) talk to, whatever the image format underneath.
//!
//! Implementations: [`RawFile`] here, VHDX in `vireo-vhdx`. Backends are shared between I/O
//! threads (`&self` methods, `Send + Sync`), so each one does its own fine-grained locking.

mod error;
mod lock;
mod raw;

pub use error::{locked_message, BlockError};
pub use lock::{downgrade_for_handover, lock, unlock, LockError, LockKind};
pub use raw::RawFile;

/// A virtual disk: a byte-addressed device of `size()` bytes.
///
/// Offsets and lengths passed in are already bounds-checked by callers against `size()`; an
/// implementation must still refuse out-of-range requests with [`BlockError::OutOfRange`] rather
/// than touching data it does not own.
pub trait BlockBackend: Send + Sync {
    /// Reads `buf.len()` bytes starting at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError>;
    /// Writes `buf` at `offset`. Data is durable only after a successful [`BlockBackend::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), BlockError>;
    /// The guest no longer needs this range; reads of it afterwards return zeroes.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Makes the range read as zeroes (default: writes zero buffers).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            self.write_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Changes the virtual size (grow or shrink).
    fn resize(&self, new_size: u64) -> Result<(), BlockError>;
    /// True when every write must be refused with [`BlockError::ReadOnly`].
    fn read_only(&self) -> bool;
    /// Logical sector size the guest should use (512 or 4096).
    fn logical_sector_size(&self) -> u32 {
        512
    }
    /// Physical sector size hint (512 or 4096).
    fn physical_sector_size(&self) -> u32 {
        512
    }
    /// A stable identifier the guest reads with VIRTIO_BLK_T_GET_ID (at most 20 bytes are used).
    fn id(&self) -> String;
}

/// Checks `offset..offset+len` against a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}
