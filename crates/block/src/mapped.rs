//! Guest disk I/O as a memcpy between guest memory and a `MAP_SHARED` mapping of the image
//! file. On this host's ext4 a 4 KiB buffered `pwrite` into a page-cached file costs 24–35 µs
//! (`ext4_block_write_begin` walks every buffer head of the large folio it lands in, under the
//! inode lock) while making the page writable through the mapping and copying costs ~1.3 µs;
//! reads from the page cache go from ~1.5 µs to ~0.5 µs (docs/datapath.md, "Mapped I/O").
//!
//! Safety rule: touching a page of a shared file mapping that cannot be backed (past the end
//! of the file, no space to allocate a hole, an I/O error reading it in) raises SIGBUS, which
//! would kill the VMM. So every copy is a guarded copy (`guarded.rs`): a SIGBUS inside it is
//! caught and turns into a failed copy, and the caller then does the whole request with
//! `preadv`/`pwritev`, which reports the real error to the guest. No page is faulted in ahead
//! (that was one `MADV_POPULATE_*` system call per request, ~30 % of a 4 KiB read's cost), and
//! no window is left between making a page present and copying it. The mapping never extends
//! past the file's end: it grows (`mremap`) only to the file's current size when a request
//! needs more, and [`FileMap::unmapped_while`] drops it around anything that may shrink the
//! file, so a fault means another process cut the file or the kernel could not back a page.
//!
//! Locking: one `RwLock` around the mapping. Copies hold it shared (any number of queues at
//! once); growing, dropping and the shrinking callers hold it exclusively, so no copy runs
//! while the mapping moves or the file shrinks.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock, RwLockReadGuard};

use vm_memory::bitmap::Bitmap;

use crate::guarded;
use crate::iov::total_len;
use crate::GuestBuf;

/// True unless `VIREO_BLK_MMAP=0` asks for the `preadv`/`pwritev` path (for comparisons).
pub fn mapped_io_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("VIREO_BLK_MMAP").map_or(true, |v| v.trim() != "0"))
}

/// The current mapping: `len` bytes of the file from offset 0 at `ptr` (`len == 0`: none).
struct Region {
    ptr: *mut u8,
    len: usize,
}

/// A lazily made, growable shared mapping of one open file, used only through guarded copies
/// (see the module documentation).
pub struct FileMap {
    region: RwLock<Region>,
    writable: bool,
    /// Set when copies cannot be made safe (no SIGBUS handler) or the file cannot be mapped:
    /// every request then takes the system call path.
    unsupported: AtomicBool,
    /// Copies that faulted and were redirected by the SIGBUS handler.
    faults: AtomicU64,
}

// SAFETY: the raw pointer is only dereferenced under the lock, for ranges checked against
// `len`, and the mapping it points to belongs to this value alone (unmapped in Drop).
unsafe impl Send for FileMap {}
// SAFETY: as above; shared access only copies through the mapping under the read lock.
unsafe impl Sync for FileMap {}

impl std::fmt::Debug for FileMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.region.read().map_or(0, |r| r.len);
        f.debug_struct("FileMap")
            .field("mapped", &len)
            .field("writable", &self.writable)
            .finish()
    }
}

impl FileMap {
    /// A map for `file` (nothing is mapped until the first request). Writable when the file
    /// was opened for writing; a read-only disk's image is mapped `PROT_READ`.
    pub fn new(file: &File) -> FileMap {
        // SAFETY: F_GETFL on a descriptor `file` keeps open; no memory is passed.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        let writable = flags >= 0 && (flags & libc::O_ACCMODE) != libc::O_RDONLY;
        FileMap {
            region: RwLock::new(Region {
                ptr: std::ptr::null_mut(),
                len: 0,
            }),
            writable,
            unsupported: AtomicBool::new(!guarded::install()),
            faults: AtomicU64::new(0),
        }
    }

    /// Bytes currently mapped (0 before the first request or after a drop).
    pub fn mapped_len(&self) -> usize {
        self.region.read().map_or(0, |r| r.len)
    }

    /// Copies that hit a page the kernel could not back and were turned into a fallback (a
    /// SIGBUS caught by the guarded copy), since this map was made.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Copies file bytes `offset..` into `bufs`, marking the pages written dirty. False when
    /// nothing can be promised (range past the file, a page that could not be read in): the
    /// caller must then do the read with `preadv`, which reports the real error; `bufs` may
    /// hold partial data.
    pub fn read(&self, file: &File, bufs: &[GuestBuf<'_>], offset: u64) -> bool {
        let Some(region) = self.covering_request(file, bufs, offset) else {
            return false;
        };
        let mut at = offset as usize;
        for b in bufs {
            let guard = b.ptr_guard_mut();
            // SAFETY: `covering_request` checked `offset + total` against the mapping, which
            // `region` keeps in place; the guard keeps the guest buffer valid for `b.len()`
            // bytes. Guest memory may change concurrently, as under a DMA device.
            let ok = unsafe { guarded::copy(guard.as_ptr(), region.ptr.add(at), b.len()) };
            // Marked even after a fault: part of the buffer may have been written.
            b.bitmap().mark_dirty(0, b.len());
            if !ok {
                return self.faulted(offset, bufs);
            }
            at += b.len();
        }
        true
    }

    /// Copies `bufs` into file bytes `offset..`. False when the range could not be written
    /// through the mapping (past the file, no space for a hole, an I/O error, a read-only
    /// mapping): the caller must then write with `pwritev`, which reports the real error and
    /// rewrites whatever part of the range the copy reached.
    pub fn write(&self, file: &File, bufs: &[GuestBuf<'_>], offset: u64) -> bool {
        if !self.writable {
            return false;
        }
        let Some(region) = self.covering_request(file, bufs, offset) else {
            return false;
        };
        let mut at = offset as usize;
        for b in bufs {
            let guard = b.ptr_guard_mut();
            // SAFETY: as in `read`, copying the other way into a writable mapping.
            let ok = unsafe { guarded::copy(region.ptr.add(at), guard.as_ptr(), b.len()) };
            if !ok {
                return self.faulted(offset, bufs);
            }
            at += b.len();
        }
        true
    }

    fn faulted(&self, offset: u64, bufs: &[GuestBuf<'_>]) -> bool {
        self.faults.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(offset, len = ?total_len(bufs), "mapped copy faulted; request goes through the file");
        false
    }

    /// Runs `shrink` (a truncate of the file) with no mapping in place and no copy running,
    /// so no mapped page can end up past the file's end. The next request maps again.
    pub fn unmapped_while<T>(&self, shrink: impl FnOnce() -> T) -> T {
        let mut r = self.region.write().unwrap_or_else(|e| e.into_inner());
        unmap(&mut r);
        shrink()
    }

    /// The read-locked mapping, covering `offset..offset+len(bufs)`, or None when the request
    /// must take the system call path.
    fn covering_request(
        &self,
        file: &File,
        bufs: &[GuestBuf<'_>],
        offset: u64,
    ) -> Option<RwLockReadGuard<'_, Region>> {
        if self.unsupported.load(Ordering::Relaxed) || bufs.len() > 1024 {
            return None;
        }
        let len = total_len(bufs)?;
        let end = usize::try_from(offset.checked_add(len)?).ok()?;
        if len == 0 {
            return None;
        }
        self.covering(file, end)
    }

    /// The read-locked mapping once it covers `..end`, grown to the file's current size if it
    /// did not; None when the file itself is shorter (or mapping fails).
    fn covering(&self, file: &File, end: usize) -> Option<RwLockReadGuard<'_, Region>> {
        {
            let r = self.region.read().ok()?;
            if end <= r.len {
                return Some(r);
            }
        }
        {
            let mut r = self.region.write().ok()?;
            // Never past the end of the file: a page there would raise SIGBUS.
            let file_len = usize::try_from(file.metadata().ok()?.len()).ok()?;
            if end > file_len {
                return None;
            }
            if file_len > r.len {
                if let Err(e) = grow(&mut r, file, file_len, self.writable) {
                    // A file that cannot be mapped (a filesystem without mmap, no address
                    // space) stays on the system call path rather than retrying every request.
                    tracing::info!(error = %e, "mapping the image failed; disk I/O uses preadv/pwritev");
                    self.unsupported.store(true, Ordering::Relaxed);
                    return None;
                }
            }
        }
        let r = self.region.read().ok()?;
        (end <= r.len).then_some(r)
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        let r = self.region.get_mut().unwrap_or_else(|e| e.into_inner());
        unmap(r);
    }
}

/// Maps (or extends the mapping to) the first `len` bytes of `file`.
fn grow(r: &mut Region, file: &File, len: usize, writable: bool) -> std::io::Result<()> {
    let ptr = if r.len == 0 {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping of our own descriptor; nothing else is at the address
        // the kernel picks.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        }
    } else {
        // mremap keeps the page tables of what was mapped; a fresh mmap would fault it all
        // in again.
        // SAFETY: `r` is our mapping of `r.len` bytes and no copy uses it (write lock held).
        unsafe { libc::mremap(r.ptr.cast(), r.len, len, libc::MREMAP_MAYMOVE) }
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    r.ptr = ptr.cast();
    r.len = len;
    Ok(())
}

fn unmap(r: &mut Region) {
    if r.len > 0 {
        // SAFETY: our own mapping of `r.len` bytes, with no copy using it (exclusive access).
        unsafe { libc::munmap(r.ptr.cast(), r.len) };
    }
    r.ptr = std::ptr::null_mut();
    r.len = 0;
}
