//! Guest disk I/O as a memcpy between guest memory and a `MAP_SHARED` mapping of the image
//! file. On this host's ext4 a 4 KiB buffered `pwrite` into a page-cached file costs 24–35 µs
//! (`ext4_block_write_begin` walks every buffer head of the large folio it lands in, under the
//! inode lock) while making the page writable through the mapping and copying costs ~1.3 µs;
//! reads from the page cache go from ~1.5 µs to ~0.5 µs (docs/datapath.md, "Mapped I/O").
//!
//! Safety rule: touching a page of a shared file mapping that cannot be backed (past the end
//! of the file, no space to allocate a hole, an I/O error reading it in) raises SIGBUS, which
//! would kill the VMM. So every copy is preceded by `MADV_POPULATE_WRITE` (writes) or
//! `MADV_POPULATE_READ` (reads) on exactly its file range: the kernel faults the pages in
//! ahead and returns the error instead of signalling. When it fails the caller does the request
//! with `preadv`/`pwritev`, which reports the real error to the guest as before. The mapping
//! never extends past the file's end: it grows (`mremap`) only to the file's current size when
//! a request needs more, and [`FileMap::unmapped_while`] drops it around anything that may
//! shrink the file. The window left open (a populated page evicted before the copy and failing
//! to come back) is described in docs/datapath.md.
//!
//! Locking: one `RwLock` around the mapping. Copies hold it shared (any number of queues at
//! once); growing, dropping and the shrinking callers hold it exclusively, so no copy runs
//! while the mapping moves or the file shrinks.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{OnceLock, RwLock, RwLockReadGuard};

use vm_memory::bitmap::Bitmap;

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

/// A lazily made, growable shared mapping of one open file, used only through populate-checked
/// copies (see the module documentation).
pub struct FileMap {
    region: RwLock<Region>,
    writable: bool,
    /// Set when the kernel has no `MADV_POPULATE_*` (before 5.14): without it copies are not
    /// safe, so every request takes the system call path.
    unsupported: AtomicBool,
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
            unsupported: AtomicBool::new(false),
        }
    }

    /// Bytes currently mapped (0 before the first request or after a drop).
    pub fn mapped_len(&self) -> usize {
        self.region.read().map_or(0, |r| r.len)
    }

    /// Copies file bytes `offset..` into `bufs`, marking the pages written dirty. False when
    /// nothing can be promised (range past the file, populate failed): the caller must then do
    /// the read with `preadv`, which reports the real error; `bufs` may hold partial data.
    pub fn read(&self, file: &File, bufs: &[GuestBuf<'_>], offset: u64) -> bool {
        let Some(region) = self.populated(file, bufs, offset, libc::MADV_POPULATE_READ) else {
            return false;
        };
        let mut at = offset as usize;
        for b in bufs {
            let guard = b.ptr_guard_mut();
            // SAFETY: `populated` checked `offset + total` against the mapping held by
            // `region` and faulted the range in; the guard keeps the guest buffer valid for
            // `b.len()` bytes. Guest memory may change concurrently, as under a DMA device.
            unsafe {
                std::ptr::copy_nonoverlapping(region.ptr.add(at), guard.as_ptr(), b.len());
            }
            b.bitmap().mark_dirty(0, b.len());
            at += b.len();
        }
        true
    }

    /// Copies `bufs` into file bytes `offset..`. False when the range could not be made
    /// writable (past the file, no space for a hole, an I/O error, a read-only mapping): the
    /// caller must then write with `pwritev`, which reports the real error.
    pub fn write(&self, file: &File, bufs: &[GuestBuf<'_>], offset: u64) -> bool {
        if !self.writable {
            return false;
        }
        let Some(region) = self.populated(file, bufs, offset, libc::MADV_POPULATE_WRITE) else {
            return false;
        };
        let mut at = offset as usize;
        for b in bufs {
            let guard = b.ptr_guard_mut();
            // SAFETY: as in `read`, with the pages made writable by MADV_POPULATE_WRITE.
            unsafe {
                std::ptr::copy_nonoverlapping(guard.as_ptr(), region.ptr.add(at), b.len());
            }
            at += b.len();
        }
        true
    }

    /// Runs `shrink` (a truncate of the file) with no mapping in place and no copy running,
    /// so no mapped page can end up past the file's end. The next request maps again.
    pub fn unmapped_while<T>(&self, shrink: impl FnOnce() -> T) -> T {
        let mut r = self.region.write().unwrap_or_else(|e| e.into_inner());
        unmap(&mut r);
        shrink()
    }

    /// The read-locked mapping, covering `offset..offset+len(bufs)` and populated with
    /// `advice`, or None when the request must take the system call path.
    fn populated(
        &self,
        file: &File,
        bufs: &[GuestBuf<'_>],
        offset: u64,
        advice: libc::c_int,
    ) -> Option<RwLockReadGuard<'_, Region>> {
        if self.unsupported.load(Ordering::Relaxed) || bufs.len() > 1024 {
            return None;
        }
        let len = total_len(bufs)?;
        let end = usize::try_from(offset.checked_add(len)?).ok()?;
        if len == 0 {
            return None;
        }
        let region = self.covering(file, end)?;
        let page = page_size();
        let start = offset as usize / page * page;
        // SAFETY: madvise only on our own mapping, `start..end` inside it (checked by
        // `covering`); populate touches no memory of ours, it faults pages in.
        let rc = unsafe { libc::madvise(region.ptr.add(start).cast(), end - start, advice) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                tracing::info!("MADV_POPULATE unsupported ({e}); disk I/O uses preadv/pwritev");
                self.unsupported.store(true, Ordering::Relaxed);
            } else {
                tracing::debug!(offset, len, error = %e, "populate failed; request goes through the file");
            }
            return None;
        }
        Some(region)
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

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no memory arguments.
    *PAGE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize })
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
