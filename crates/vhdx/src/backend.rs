//! The VMM's view of a VHDX disk.

use vireo_block::{read_vectored_by_copy, write_vectored_by_copy};
use vireo_block::{BlockBackend, BlockError, GuestBuf};

use crate::Vhdx;

impl BlockBackend for Vhdx {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        Ok(self.read(buf, offset)?)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        Ok(self.write(buf, offset)?)
    }

    /// One `preadv` into guest memory when the request lies in one fully present block
    /// (`vectored.rs`), else staged through `read`.
    fn read_vectored_at(&self, bufs: &[GuestBuf<'_>], offset: u64) -> Result<(), BlockError> {
        if self.read_direct(bufs, offset) {
            return Ok(());
        }
        read_vectored_by_copy(self, bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &[GuestBuf<'_>], offset: u64) -> Result<(), BlockError> {
        if self.write_direct(bufs, offset)? {
            return Ok(());
        }
        write_vectored_by_copy(self, bufs, offset)
    }

    fn flush(&self) -> Result<(), BlockError> {
        Ok(Vhdx::flush(self)?)
    }

    fn dup_locked_file(&self) -> Option<std::io::Result<std::fs::File>> {
        Some(self.top().io.file().try_clone())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        Ok(Vhdx::discard(self, offset, len)?)
    }

    /// Discarded ranges read as zero in every disk type, so zeroing is a discard.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        Ok(Vhdx::discard(self, offset, len)?)
    }

    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn resize(&self, new_size: u64) -> Result<(), BlockError> {
        Ok(Vhdx::resize(self, new_size, false)?)
    }

    fn read_only(&self) -> bool {
        self.is_read_only()
    }

    fn logical_sector_size(&self) -> u32 {
        Vhdx::logical_sector_size(self)
    }

    fn physical_sector_size(&self) -> u32 {
        Vhdx::physical_sector_size(self)
    }

    /// The Page 83 identifier: stable for the disk's life and unique per disk.
    fn id(&self) -> String {
        let g = self.top().params.page83.to_string();
        g.trim_matches(|c| c == '{' || c == '}')
            .replace('-', "")
            .chars()
            .take(20)
            .collect()
    }
}

// I/O threads share one disk: fail the build if that ever stops being possible.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Vhdx>();
};
