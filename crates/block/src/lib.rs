//! Block storage as the VMM sees it: one [`BlockBackend`] trait that virtio-blk (and later
//! storage migration and replica) talk to, whatever the image format underneath.
//!
//! Implementations: [`RawFile`] here, VHDX in `vireo-vhdx`. Backends are shared between I/O
//! threads (`&self` methods, `Send + Sync`), so each one does its own fine-grained locking.

mod error;
// x86_64 Linux only, like the product (its copy is assembly, its handler reads REG_RIP).
mod guarded;
pub mod handover;
mod iov;
mod lock;
mod mapped;
mod raw;
mod uring;

pub use error::{locked_message, BlockError};
pub use iov::{
    guest_bufs_len, read_file_vectored, read_vectored_by_copy, write_file_vectored,
    write_vectored_by_copy, GuestBuf,
};
pub use lock::{downgrade_for_handover, lock, unlock, LockError, LockKind};
pub use mapped::{mapped_io_enabled, FileMap};
pub use raw::RawFile;
pub use uring::{Batcher, VecOp};

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
    /// Reads `sum(bufs.len())` bytes starting at `offset` straight into guest memory, the
    /// buffers filled in order. Implementations that can (raw files: `preadv`) do it without a
    /// copy; the default goes through [`BlockBackend::read_at`] and a bounce buffer. Pages
    /// written are marked dirty in guest memory's bitmap either way.
    fn read_vectored_at(&self, bufs: &[GuestBuf<'_>], offset: u64) -> Result<(), BlockError> {
        read_vectored_by_copy(self, bufs, offset)
    }
    /// Writes the concatenation of `bufs` (guest memory) at `offset`; the vectored twin of
    /// [`BlockBackend::write_at`], with the same durability rule.
    fn write_vectored_at(&self, bufs: &[GuestBuf<'_>], offset: u64) -> Result<(), BlockError> {
        write_vectored_by_copy(self, bufs, offset)
    }
    /// `Some(fd)` when the disk's bytes are exactly the bytes of `fd` at the same offsets (a
    /// raw file), so callers may batch vectored reads and writes on it ([`Batcher`]). They
    /// still check ranges against [`BlockBackend::size`] and honour `read_only` first.
    fn vectored_fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }
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
    /// A new descriptor of the open file that holds this disk's lock (the top file of a
    /// chain), so the lock can outlive the backend: a saved VM's disks stay locked by vireod
    /// until the restored worker opens them from these descriptors ([`handover`]). `None`
    /// when the disk is not one locked file (a placeholder, a disk mid-move).
    fn dup_locked_file(&self) -> Option<std::io::Result<std::fs::File>> {
        None
    }
}

/// Checks `offset..offset+len` against a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}
