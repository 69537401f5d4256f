//! Guest RAM from the host's hugetlb pool (`/proc/sys/vm/nr_hugepages`, 2 MiB pages).
//!
//! Why: pool pages never return to the buddy allocator, so a page a previous VM (or migration,
//! or restore) freed is still backed by the host when the next one takes it: measured on this
//! host (itself a VM with free page reporting), a first touch and copy of 64 MiB took 11–15 ms
//! from the pool against 147–167 ms on huge tmpfs, whose fresh huge pages are cleared and
//! faulted in at the outer host every time (docs/migration.md, "Guest RAM from the hugetlb
//! pool").
//!
//! What differs from a shmem file, and where each rule lives (all in `memory.rs`):
//! - the size must be a multiple of 2 MiB ([`fits`]);
//! - pages are reserved when the file is mapped without `MAP_NORESERVE`, so a short pool fails
//!   the mapping with ENOMEM at creation instead of a SIGBUS on a later touch;
//! - no `write`/`pwrite` (EINVAL): the VMM writes through its mapping (`GuestRam::write_at`);
//! - hole punching frees whole 2 MiB pages and zeroes the partial ones at either end (what
//!   every caller wants: "these bytes are zero now");
//! - `SEEK_DATA` reports the whole file as data, so `is_hole` never skips a range;
//! - userfaultfd works only in whole huge pages, which post-copy and lazy restore cannot use:
//!   those never put RAM here (`RamBacking::for_userfaultfd`, the post-copy refusal).

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

/// The pool's page size; the only one used.
pub const HUGE_PAGE: u64 = 2 << 20;

const SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// The pool's state, in 2 MiB pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    pub free: u64,
    /// Free pages already promised to mappings that have not touched them yet.
    pub reserved: u64,
}

impl Pool {
    /// The pool now; `None` where the host has no 2 MiB pool (or it cannot be read).
    pub fn read() -> Option<Pool> {
        let read = |name: &str| -> Option<u64> {
            std::fs::read_to_string(format!("{SYSFS}/{name}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Some(Pool {
            free: read("free_hugepages")?,
            reserved: read("resv_hugepages")?,
        })
    }

    /// Pages a new mapping can still reserve.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
}

/// Whether `size` bytes of RAM can come from `pool`: a whole number of 2 MiB pages, all of
/// them available. Others may take pages between this and the mapping; the mapping's ENOMEM
/// is the final word.
pub fn fits(size: u64, pool: Option<Pool>) -> bool {
    size.is_multiple_of(HUGE_PAGE) && pool.is_some_and(|p| p.available() >= size / HUGE_PAGE)
}

/// A `size`-byte file on the kernel's internal hugetlbfs (2 MiB pages). Nothing is reserved
/// until it is mapped.
pub fn create(size: u64) -> io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"vireo-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("memfd_create(MFD_HUGETLB): {e}"),
        ));
    }
    // SAFETY: fd is a freshly created descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn fits_counts_free_pages_less_reserved_ones() {
        let pool = |free, reserved| Some(Pool { free, reserved });
        assert!(fits(64 * MIB, pool(32, 0)));
        assert!(fits(64 * MIB, pool(40, 8)));
        assert!(!fits(64 * MIB, pool(40, 9)), "one page short");
        assert!(!fits(64 * MIB, pool(31, 0)));
        assert!(!fits(64 * MIB, pool(0, 5)), "more reserved than free");
        assert!(!fits(64 * MIB, None), "no pool on this host");
        // A size that is no whole number of 2 MiB pages cannot be a hugetlb file.
        assert!(!fits(65 * MIB, pool(512, 0)));
    }
}
