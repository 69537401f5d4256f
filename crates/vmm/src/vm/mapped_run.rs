//! Guest RAM as the migration source's stream threads read it: straight from the VMM's own
//! mapping where the pages exist, so on a TLS stream the cipher's copy into its record is the
//! only copy of page data on this side. A `pread` into the record before it was ~16 % of the
//! stream threads' CPU (session 28, docs/migration.md "The source's copies").

use std::fs::File;
use std::os::unix::io::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::VmHandle;

impl VmHandle {
    /// The `len` bytes of guest RAM at `gpa` (RAM-file offset `off`) as they lie in the VMM's
    /// mapping, or `None` where a `pread` is the better read: some of them are holes in the
    /// RAM file (reading a hole through the mapping would allocate it; `pread` reads zeros
    /// and allocates nothing), or the range is not one piece of the mapping.
    ///
    /// The guest may write these bytes while the caller reads them, as it may while a
    /// `pread` copies them: a caller must only scan and copy them, never rely on two reads
    /// agreeing, and count on the dirty log (fetched before the pass) to send a page the
    /// guest changed again.
    pub(super) fn mapped_run(&self, gpa: u64, off: u64, len: u64) -> Option<&[u8]> {
        // hugetlbfs reports no holes at all, so on the pool the mapping would fault in (take
        // from the pool and zero) every page the guest never wrote; `pread` reads those as
        // zeros without allocating them.
        if self.0.ram.kind == crate::memory::RamKind::HugeTlb {
            return None;
        }
        if !all_data(&self.0.ram.memfd, off, len) {
            return None;
        }
        let slice = self
            .0
            .ram
            .memory
            .get_slice(GuestAddress(gpa), len as usize)
            .ok()?;
        let ptr = slice.ptr_guard().as_ptr();
        // SAFETY: `get_slice` checked that the `len` bytes at `ptr` lie inside one region of
        // guest RAM, which stays mapped for as long as this handle (and so the returned
        // borrow) lives: regions are never unmapped while the VM exists. Every byte value is
        // a valid u8, so a concurrent write by the guest's vCPU can make what is read stale
        // or torn, never invalid; the contract above makes that harmless.
        Some(unsafe { std::slice::from_raw_parts(ptr, len as usize) })
    }
}

/// Whether the `len` bytes at `off` of `file` are all data: no hole starts before their end.
fn all_data(file: &File, off: u64, len: u64) -> bool {
    // SAFETY: plain syscall on a descriptor we own; it moves only the file position, which
    // nothing uses (all I/O on guest RAM is positional).
    let hole = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_HOLE) };
    hole >= 0 && hole as u64 >= off + len
}
