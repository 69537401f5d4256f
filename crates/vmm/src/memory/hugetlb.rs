//! Guest RAM from the host's hugetlb pool (`/proc/sys/vm/nr_hugepages`, 2 MiB pages).
//!
//! Why: pool pages never return to the buddy allocator, so a page a previous VM (or migration,
//! or restore) freed is still backed by the host when the next one takes it: measured on this
//! host (itself a VM with free page reporting), a first touch and copy of 64 MiB took 11–15 ms
//! from the pool against 147–167 ms on huge tmpfs, whose fresh huge pages are cleared and
//! faulted in at the outer host every time (docs/migration-performance.md, "Guest RAM from the
//! hugetlb pool").
//!
//! What differs from a shmem file, and where each rule lives (all in `memory.rs`):
//! - the size must be a multiple of 2 MiB ([`fits`]);
//! - pages are reserved when the file is mapped without `MAP_NORESERVE`, so a short pool fails
//!   the mapping with ENOMEM at creation instead of a SIGBUS on a later touch;
//! - no `write`/`pwrite` (EINVAL): the VMM writes through its mapping (`GuestRam::write_at`);
//! - hole punching frees whole 2 MiB pages and zeroes the partial ones at either end (what
//!   every caller wants: "these bytes are zero now");
//! - `SEEK_DATA` reports the whole file as data, so `is_hole` never skips a range; what
//!   tells a never-written page here is [`mapped_here`] with [`file_pages`] (a migration's
//!   source reads, `vm/mapped_run.rs`);
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

/// How many 4 KiB pages of the `len` bytes at `addr` (inside a hugetlb mapping of this
/// process, 4 KiB-aligned) are mapped in this process's page tables: `mincore` reports exactly
/// that on hugetlb, not whether the file holds them. A page the guest touched is mapped here
/// (KVM faults it in through this mapping), as is one the VMM wrote through it; one that only
/// another process wrote (a vhost-user back end's mapping) is not, hence [`file_pages`].
pub fn mapped_here(addr: *const u8, len: usize) -> io::Result<usize> {
    let addr = addr as usize;
    const PAGE: usize = super::PAGE_SIZE as usize;
    const STEP: usize = HUGE_PAGE as usize;
    // The kernel fills a byte per 4 KiB page: 512 for each call's 2 MiB.
    let mut vec = [0u8; STEP / PAGE];
    let mut mapped = 0;
    let mut done = 0;
    while done < len {
        let n = STEP.min(len - done);
        let v = &mut vec[..n.div_ceil(PAGE)];
        // SAFETY: mincore reads only page tables, never the memory (a range that is not
        // mapped is ENOMEM), and `v` has one byte per 4 KiB page of the range, as it writes.
        let r = unsafe { libc::mincore((addr + done) as *mut libc::c_void, n, v.as_mut_ptr()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        mapped += v.iter().filter(|&&b| b & 1 != 0).count();
        done += n;
    }
    Ok(mapped)
}

/// The 2 MiB pages `file` (on hugetlbfs) holds: its `st_blocks`, which hugetlbfs raises for
/// every page it adds to the file and lowers for every page it frees.
pub fn file_pages(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512 / HUGE_PAGE)
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

    /// `mapped_here` and `file_pages` on a real pool file: what a migration's source trusts
    /// to skip never-written pages unread.
    #[test]
    fn mapped_here_sees_this_process_pages_and_file_pages_all_of_them() {
        use std::os::fd::AsRawFd;
        let size = 4 * HUGE_PAGE;
        let file = create(size).expect("pool file");
        // The pool is shared with other tests' VMs: a short pool is waited for (each mapping
        // reserves the file's pages, so the first one that succeeds holds them).
        let map = |f: &File| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                // SAFETY: a fresh shared mapping of the whole file, checked below.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        size as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        f.as_raw_fd(),
                        0,
                    )
                };
                if p != libc::MAP_FAILED {
                    return Some(p as *mut u8);
                }
                if std::time::Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        };
        let Some(a) = map(&file) else {
            vireo_testkit::skip(
                "4 free pages in the 2 MiB hugetlb pool (/proc/sys/vm/nr_hugepages)",
            );
            return;
        };
        let b = map(&file).expect("a second mapping of reserved pages");
        let per = (HUGE_PAGE / 4096) as usize;
        assert_eq!(mapped_here(a, size as usize).unwrap(), 0);
        assert_eq!(file_pages(&file).unwrap(), 0);
        // SAFETY: inside the mapping `a`.
        unsafe { a.add(HUGE_PAGE as usize + 8).write_volatile(7) };
        assert_eq!(mapped_here(a, size as usize).unwrap(), per);
        assert_eq!(file_pages(&file).unwrap(), 1);
        // Another mapping (another process's, as a back end's) writes page 3: the file holds
        // it, this mapping does not show it.
        // SAFETY: inside the mapping `b`.
        unsafe { b.add(3 * HUGE_PAGE as usize).write_volatile(9) };
        assert_eq!(mapped_here(a, size as usize).unwrap(), per);
        assert_eq!(file_pages(&file).unwrap(), 2);
        // Partial and unaligned ranges count their 4 KiB pages.
        // SAFETY: inside the mapping `a`.
        let mid = unsafe { a.add(HUGE_PAGE as usize + 4096) };
        assert_eq!(mapped_here(mid, 8192).unwrap(), 2);
        // SAFETY: both mappings are ours and unused from here.
        unsafe {
            libc::munmap(a as *mut libc::c_void, size as usize);
            libc::munmap(b as *mut libc::c_void, size as usize);
        }
    }
}
