//! Vectored I/O between a backend and guest memory. A request's data lives in a handful of
//! guest buffers (one per descriptor); handing those to `preadv`/`pwritev` directly saves the
//! copy through a staging buffer, which at 4 KiB costs as much as the system call and at 1 MiB
//! halves the throughput. Backends that cannot (yet) address their storage that way use the
//! `*_by_copy` fallbacks here.

use std::os::unix::io::RawFd;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, BS};
use vm_memory::{Bytes, VolatileSlice};

use crate::{check_range, BlockBackend, BlockError};

/// One contiguous piece of guest memory, with the dirty bitmap of its region: the type guest
/// memory (`GuestMemoryMmap<AtomicBitmap>`) hands out for a range.
pub type GuestBuf<'a> = VolatileSlice<'a, BS<'a, AtomicBitmap>>;

/// Largest staging buffer the fallbacks allocate at once.
const COPY_CHUNK: usize = 256 * 1024;

/// Total bytes of `bufs`, or `None` if it overflows.
pub(crate) fn total_len(bufs: &[GuestBuf<'_>]) -> Option<u64> {
    bufs.iter()
        .try_fold(0u64, |acc, b| acc.checked_add(b.len() as u64))
}

/// [`BlockBackend::read_vectored_at`] through `read_at` and a bounce buffer.
pub fn read_vectored_by_copy<B: BlockBackend + ?Sized>(
    backend: &B,
    bufs: &[GuestBuf<'_>],
    offset: u64,
) -> Result<(), BlockError> {
    let mut stage = Vec::new();
    let mut pos = offset;
    for buf in bufs {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(COPY_CHUNK);
            stage.resize(n, 0);
            backend.read_at(&mut stage[..n], pos)?;
            // write_slice marks the pages dirty.
            buf.write_slice(&stage[..n], done)
                .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
            done += n;
            pos += n as u64;
        }
    }
    Ok(())
}

/// [`BlockBackend::write_vectored_at`] through `write_at` and a bounce buffer.
pub fn write_vectored_by_copy<B: BlockBackend + ?Sized>(
    backend: &B,
    bufs: &[GuestBuf<'_>],
    offset: u64,
) -> Result<(), BlockError> {
    let mut stage = Vec::new();
    let mut pos = offset;
    for buf in bufs {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(COPY_CHUNK);
            stage.resize(n, 0);
            buf.read_slice(&mut stage[..n], done)
                .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
            backend.write_at(&stage[..n], pos)?;
            done += n;
            pos += n as u64;
        }
    }
    Ok(())
}

/// Total bytes of `bufs`, or `None` if it overflows (for backends mapping a request).
pub fn guest_bufs_len(bufs: &[GuestBuf<'_>]) -> Option<u64> {
    total_len(bufs)
}

/// `preadv` of `bufs` from `fd` at `file_offset`, for a backend that mapped the request to one
/// extent of its file (a VHDX payload block). Resumed after short reads; the file ending early
/// is an error. Pages read into are marked dirty.
pub fn read_file_vectored(
    fd: RawFd,
    bufs: &[GuestBuf<'_>],
    file_offset: u64,
) -> Result<(), BlockError> {
    transfer(fd, Dir::Read, bufs, file_offset, u64::MAX)
}

/// `pwritev` of `bufs` to `fd` at `file_offset`; the write twin of [`read_file_vectored`].
pub fn write_file_vectored(
    fd: RawFd,
    bufs: &[GuestBuf<'_>],
    file_offset: u64,
) -> Result<(), BlockError> {
    transfer(fd, Dir::Write, bufs, file_offset, u64::MAX)
}

/// Direction of a vectored transfer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// File → guest memory (`preadv`).
    Read,
    /// Guest memory → file (`pwritev`).
    Write,
}

/// `preadv`/`pwritev` of `bufs` at `offset` of `fd`, resumed after short transfers; the file
/// ending early is an error (callers check ranges first, so it means the file shrank under us).
/// Pages read into are marked dirty.
pub(crate) fn transfer(
    fd: RawFd,
    dir: Dir,
    bufs: &[GuestBuf<'_>],
    offset: u64,
    size: u64,
) -> Result<(), BlockError> {
    let Some(len) = total_len(bufs) else {
        return Err(BlockError::OutOfRange {
            offset,
            len: u64::MAX,
            size,
        });
    };
    check_range(offset, len, size)?;
    // The guards keep the mappings' pointers valid (and, for Xen-style mappings, mapped) while
    // the kernel uses them.
    let guards: Vec<_> = bufs.iter().map(|b| (b.ptr_guard_mut(), b.len())).collect();
    let mut iovs: Vec<libc::iovec> = guards
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(g, n)| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: *n,
        })
        .collect();
    let mut first = 0;
    let mut pos = offset;
    // Bounded: every pass moves at least one byte or returns.
    while first < iovs.len() {
        // The kernel takes at most IOV_MAX (1024) vectors per call.
        let batch = &iovs[first..iovs.len().min(first + 1024)];
        // SAFETY: every iovec points into guest memory that `bufs` (VolatileSlices, valid for
        // their length while borrowed) covers, kept alive by `guards`; the kernel accesses no
        // more than each iov_len. Guest memory may change concurrently, which the kernel's
        // copy tolerates (it is what a DMA device sees too).
        let rc = unsafe {
            match dir {
                Dir::Read => libc::preadv(fd, batch.as_ptr(), batch.len() as i32, pos as i64),
                Dir::Write => libc::pwritev(fd, batch.as_ptr(), batch.len() as i32, pos as i64),
            }
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if rc == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        let mut moved = rc as usize;
        pos += moved as u64;
        // Skip the vectors done, shorten the one cut in the middle.
        while moved > 0 {
            let iov = &mut iovs[first];
            if moved >= iov.iov_len {
                moved -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: stays inside the same iovec's buffer (moved < iov_len).
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(moved).cast() };
                iov.iov_len -= moved;
                moved = 0;
            }
        }
    }
    if dir == Dir::Read {
        for b in bufs {
            b.bitmap().mark_dirty(0, b.len());
        }
    }
    Ok(())
}
