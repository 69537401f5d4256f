//! Guest RAM as the migration source's stream threads read it: straight from the VMM's own
//! mapping where the pages exist, so on a TLS stream the cipher's copy into its record is the
//! only copy of page data on this side. A `pread` into the record before it was ~16 % of the
//! stream threads' CPU (session 28, docs/migration-performance.md "The source's copies").

use std::fs::File;
use std::os::unix::io::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::VmHandle;
use crate::memory::{hugetlb, PAGE_SIZE};

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
        let hugetlb = self.0.ram.kind == crate::memory::RamKind::HugeTlb;
        // hugetlbfs reports no holes at all, so there a page counts as present when it is
        // mapped in this process (on the pool the mapping would otherwise take a page from
        // the pool and zero it for every page the guest never wrote).
        if !hugetlb && !all_data(&self.0.ram.memfd, off, len) {
            return None;
        }
        let slice = self
            .0
            .ram
            .memory
            .get_slice(GuestAddress(gpa), len as usize)
            .ok()?;
        let ptr = slice.ptr_guard().as_ptr();
        if hugetlb && hugetlb::mapped_here(ptr, len as usize).ok()? as u64 * PAGE_SIZE != len {
            return None;
        }
        // SAFETY: `get_slice` checked that the `len` bytes at `ptr` lie inside one region of
        // guest RAM, which stays mapped for as long as this handle (and so the returned
        // borrow) lives: regions are never unmapped while the VM exists. Every byte value is
        // a valid u8, so a concurrent write by the guest's vCPU can make what is read stale
        // or torn, never invalid; the contract above makes that harmless.
        Some(unsafe { std::slice::from_raw_parts(ptr, len as usize) })
    }

    /// Whether the guest never wrote the `len` bytes at `gpa` (RAM-file offset `off`): a hole
    /// in the RAM file, or on the hugetlb pool, with `unmapped_is_hole` (this pass's
    /// [`VmHandle::unmapped_is_hole`]), pages not mapped in this process. A page written
    /// after the look is in the dirty log, so an answer here is never wrong for long.
    pub(super) fn never_written(
        &self,
        gpa: u64,
        off: u64,
        len: u64,
        unmapped_is_hole: bool,
    ) -> bool {
        if crate::memory::is_hole(&self.0.ram.memfd, off, len) {
            return true;
        }
        if !unmapped_is_hole {
            return false;
        }
        let Ok(slice) = self.0.ram.memory.get_slice(GuestAddress(gpa), len as usize) else {
            return false;
        };
        hugetlb::mapped_here(slice.ptr_guard().as_ptr(), len as usize).is_ok_and(|n| n == 0)
    }

    /// On the hugetlb pool (where `SEEK_DATA` sees no holes): whether every page the RAM file
    /// holds is mapped in this process, so that a page not mapped here was never written. Not
    /// so when another process (a vhost-user back end) wrote a page the guest never touched;
    /// then each page is read. Asked once per pass with the dirty log on: a page written
    /// after the look is in the log, and one added between the two counts makes them differ.
    pub(super) fn unmapped_is_hole(&self) -> bool {
        let ram = &self.0.ram;
        if ram.kind != crate::memory::RamKind::HugeTlb {
            return false;
        }
        let mut mapped = 0u64;
        for region in ram.memory.iter() {
            match hugetlb::mapped_here(region.as_ptr(), region.len() as usize) {
                Ok(n) => mapped += n as u64,
                Err(_) => return false,
            }
        }
        hugetlb::file_pages(&ram.memfd)
            .is_ok_and(|held| held * (hugetlb::HUGE_PAGE / PAGE_SIZE) == mapped)
    }
}

/// Whether the `len` bytes at `off` of `file` are all data: no hole starts before their end.
fn all_data(file: &File, off: u64, len: u64) -> bool {
    // SAFETY: plain syscall on a descriptor we own; it moves only the file position, which
    // nothing uses (all I/O on guest RAM is positional).
    let hole = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_HOLE) };
    hole >= 0 && hole as u64 >= off + len
}
