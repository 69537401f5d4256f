//! Reads and writes straight between a VHDX file and guest memory (a copy through the file's
//! shared mapping, `vireo_block::FileMap`, or `preadv`/`pwritev` on the guest's buffers when
//! the range cannot be faulted in), for the common case: the request lies inside one payload block that is
//! fully present in the top file. A 1 MiB request then costs one system call and one copy (the
//! kernel's), instead of four staged 256 KiB `read_at`s and a second copy into guest memory.
//! Everything else — a request across a block boundary, a block absent, partially present or
//! inherited from a parent, a read-only log overlay, a fault injector under test, any error —
//! answers `false` and the caller takes the staged path (`read`/`write`), which handles it and
//! reports the real error. Locks as in `disk.rs`: the chain shared for the whole call, the
//! file's I/O gate shared across the payload I/O, the BAT read-locked to copy one entry.

use vireo_block::{guest_bufs_len, BlockError, GuestBuf};

use crate::disk::Chain;
use crate::format::bat;
use crate::layer::{DataGuid, Layer};
use crate::Vhdx;

impl Vhdx {
    /// Reads `bufs` at virtual `offset` with one `preadv` if the request is direct-able;
    /// false means nothing was read and the caller must use the staged path.
    pub(crate) fn read_direct(&self, bufs: &[GuestBuf<'_>], offset: u64) -> bool {
        let c = self.io();
        let Some((l, inb, pi)) = direct_target(&c, bufs, offset) else {
            return false;
        };
        let _io = l.space.io_gate(); // until the read of the looked-up offset is done
        let e = l.bat.read().entries[pi];
        bat::state(e) == bat::FULLY_PRESENT && l.io.read_guest(bufs, bat::offset(e) + inb).is_ok()
    }

    /// Writes `bufs` at virtual `offset` with one `pwritev` into a fully present block; false
    /// means the caller must use the staged path (which then writes the same bytes again if
    /// this one failed part-way, harmlessly).
    pub(crate) fn write_direct(
        &self,
        bufs: &[GuestBuf<'_>],
        offset: u64,
    ) -> Result<bool, BlockError> {
        let c = self.io();
        if c.read_only {
            return Ok(false);
        }
        let Some((l, inb, pi)) = direct_target(&c, bufs, offset) else {
            return Ok(false);
        };
        let len = guest_bufs_len(bufs).unwrap_or(0);
        let ls = l.geo.logical_sector;
        if l.geo.differencing && (!offset.is_multiple_of(ls) || !len.is_multiple_of(ls)) {
            // Sector bitmaps need the widening the staged path does.
            return Ok(false);
        }
        l.begin_session(DataGuid::New)?;
        let io = l.space.io_gate(); // until the write to the looked-up offset is done
        let e = l.bat.read().entries[pi];
        if bat::state(e) != bat::FULLY_PRESENT {
            return Ok(false);
        }
        l.reserve(bat::offset(e), bat::offset(e) + inb, len);
        let r = l.io.write_guest(bufs, bat::offset(e) + inb);
        drop(io);
        // As `Vhdx::write`: marked after the write, even a failed one, with the chain held.
        self.dirty.mark(offset, len);
        if r.is_err() {
            return Ok(false);
        }
        l.wrote(len);
        Ok(true)
    }
}

/// The top layer, the offset inside the payload block and the block's BAT index, when the request is non-empty, in range and inside one block of a file that
/// allows direct I/O.
fn direct_target<'c>(
    c: &'c Chain,
    bufs: &[GuestBuf<'_>],
    offset: u64,
) -> Option<(&'c Layer, u64, usize)> {
    let len = guest_bufs_len(bufs)?;
    let end = offset.checked_add(len)?;
    if len == 0 || end > c.virtual_size() || bufs.len() > 1024 {
        return None;
    }
    let l = c.top();
    l.io.direct_fd()?;
    let bs = l.geo.block_size;
    let block = offset / bs;
    if (end - 1) / bs != block {
        return None;
    }
    Some((l, offset % bs, l.geo.payload_index(block) as usize))
}
