//! Guest RAM: one file mapped shared (so it can be handed to vhost-user back ends,
//! snapshotted or migrated), split around the 32-bit MMIO hole, with vm-memory's per-page bitmap
//! recording every byte the VMM itself writes. The file comes from the host's hugetlb pool
//! (`hugetlb.rs`) when it has room, else a private huge-page tmpfs (`huge_tmpfs.rs`), else a
//! memfd ([`RamBacking`]); everything else sees the same `File` either way and calls it the
//! memfd. What a hugetlb file does not allow (`pwrite`, 4 KiB holes, userfaultfd) is handled
//! here and in [`RamBacking::for_userfaultfd`], not by each caller.

use std::fs::File;
use std::os::unix::io::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap};

use crate::error::{Result, VmmError};
use crate::GuestMemory;

mod huge_tmpfs;
pub mod hugetlb;

/// What guest RAM should be backed by (`VIREO_GUEST_RAM`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RamBacking {
    /// The hugetlb pool when it has a free page for every 2 MiB of this VM's RAM, else
    /// [`RamBacking::Huge`]. Many VMs at once simply use the pool up, and the rest fall back.
    #[default]
    Auto,
    /// The hugetlb pool or nothing: a VM the pool cannot hold fails to start, naming the sysctl.
    HugeTlb,
    /// 2 MiB host pages wherever the file holds data, so KVM maps 2 MiB at a time where the
    /// guest's own page tables do (Linux's direct map, the probe's identity map): measured,
    /// a guest rewriting 64 MiB runs again after an in-place apply several times sooner
    /// (docs/vm-state.md, "In-place apply"). A 2 MiB region with a single page written costs
    /// 2 MiB. Needs CAP_SYS_ADMIN (a private tmpfs); without it, a memfd. Fresh pages are
    /// cleared (and, on a host that is itself a VM, faulted in at the outer host) on every
    /// first touch, which the pool's pages are not.
    Huge,
    /// A memfd: host pages of 4 KiB unless the host enables shmem huge pages (this one does
    /// not), so KVM maps the guest 4 KiB at a time, and every time KVM drops its mappings (the
    /// dirty log going off after an in-place apply, a migration's resume) the guest pays one
    /// fault per 4 KiB it touches next. The least memory for a guest that touches its RAM
    /// sparsely.
    Memfd,
}

/// What a VM's RAM got (a [`RamBacking`] after falling back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamKind {
    HugeTlb,
    HugeTmpfs,
    Memfd,
}

impl std::fmt::Display for RamKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RamKind::HugeTlb => "hugetlb pool, 2 MiB pages",
            RamKind::HugeTmpfs => "huge tmpfs, 2 MiB pages",
            RamKind::Memfd => "memfd, 4 KiB pages",
        })
    }
}

impl RamBacking {
    /// The environment variable that overrides the default.
    pub const ENV: &'static str = "VIREO_GUEST_RAM";

    /// The default, or what `VIREO_GUEST_RAM` asks for (`auto`, `hugetlb`, `huge`, `memfd`:
    /// an A/B measurement, or a host short of memory). Any other value is refused with its name.
    pub fn from_env() -> std::result::Result<RamBacking, String> {
        match std::env::var(Self::ENV) {
            Err(_) => Ok(RamBacking::default()),
            Ok(v) if v == "auto" => Ok(RamBacking::Auto),
            Ok(v) if v == "hugetlb" => Ok(RamBacking::HugeTlb),
            Ok(v) if v == "huge" => Ok(RamBacking::Huge),
            Ok(v) if v == "memfd" => Ok(RamBacking::Memfd),
            Ok(v) => Err(format!(
                "{}={v:?} is not a guest RAM backing; use `auto` (the default: the hugetlb pool \
                 when it has room, else `huge`), `hugetlb` (the pool or fail), `huge` (2 MiB \
                 pages on a private tmpfs) or `memfd` (4 KiB pages)",
                Self::ENV
            )),
        }
    }

    /// The backing for RAM that userfaultfd may fill page by page (a lazy restore, a post-copy
    /// destination): hugetlb takes `UFFDIO_COPY` only in whole 2 MiB pages, so `auto` does not
    /// choose the pool for it. An explicit `hugetlb` stays: a restore then loads eagerly, a
    /// destination refuses post-copy (`Vm::postcopy_refusal`).
    pub fn for_userfaultfd(self) -> RamBacking {
        match self {
            RamBacking::Auto => RamBacking::Huge,
            other => other,
        }
    }

    /// The kinds to try, in order, for `size` bytes with the pool as `pool` says.
    fn attempts(self, size: u64, pool: Option<hugetlb::Pool>) -> Result<&'static [RamKind]> {
        use RamKind::*;
        Ok(match self {
            RamBacking::Auto if hugetlb::fits(size, pool) => &[HugeTlb, HugeTmpfs, Memfd],
            RamBacking::Auto | RamBacking::Huge => &[HugeTmpfs, Memfd],
            RamBacking::Memfd => &[Memfd],
            RamBacking::HugeTlb if hugetlb::fits(size, pool) => &[HugeTlb],
            RamBacking::HugeTlb => return Err(pool_short(size, pool)),
        })
    }
}

/// Why the pool cannot hold `size` bytes, and what to change.
fn pool_short(size: u64, pool: Option<hugetlb::Pool>) -> VmmError {
    let pages = size.div_ceil(hugetlb::HUGE_PAGE);
    VmmError::MemoryAlloc(if !size.is_multiple_of(hugetlb::HUGE_PAGE) {
        format!(
            "{}=hugetlb needs guest RAM in whole 2 MiB pages, and {size} bytes is not; \
             round the memory size to 2 MiB or unset {}",
            RamBacking::ENV,
            RamBacking::ENV
        )
    } else {
        let have = match pool {
            Some(p) => format!("{} free ({} of them reserved)", p.free, p.reserved),
            None => "none (no 2 MiB pool on this host)".into(),
        };
        format!(
            "{}=hugetlb: {} MiB of guest RAM needs {pages} free 2 MiB pages in the hugetlb \
             pool, which has {have}; raise /proc/sys/vm/nr_hugepages (sysctl vm.nr_hugepages) \
             or unset {}",
            RamBacking::ENV,
            size >> 20,
            RamBacking::ENV
        )
    })
}

/// Start of the hole below 4 GiB that holds device MMIO (virtio-mmio, IOAPIC, LAPIC).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above the hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Smallest guest the loaders and the probe can use.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Guest page size used for dirty tracking.
pub const PAGE_SIZE: u64 = 4096;

/// Guest-physical RAM ranges `(start, len)` for `size` bytes of RAM: RAM fills 0..3 GiB first,
/// the rest continues at 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

/// RAM + swap of the host, in bytes (from /proc/meminfo); `None` when unreadable.
fn host_memory_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
}

/// Checks `size` against the minimum, page alignment and what the host can back.
pub fn check_size(size: u64) -> Result<()> {
    if size < MIN_MEMORY {
        return Err(VmmError::MemoryTooSmall {
            asked: size,
            min_mib: MIN_MEMORY >> 20,
        });
    }
    if let Some(limit) = host_memory_limit() {
        if size > limit {
            return Err(VmmError::MemoryTooLarge {
                asked_mib: size >> 20,
                limit_mib: limit >> 20,
            });
        }
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(VmmError::MemoryAlloc(format!(
            "size {size} is not a multiple of the 4 KiB page size"
        )));
    }
    Ok(())
}

fn create_memfd(size: u64) -> Result<File> {
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(c"vireo-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmmError::MemoryAlloc(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd is a freshly created descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| VmmError::MemoryAlloc(format!("sizing memfd to {size} bytes: {e}")))?;
    Ok(file)
}

/// Guest RAM plus the memfd behind it.
pub struct GuestRam {
    pub memory: GuestMemory,
    pub memfd: Arc<File>,
    pub size: u64,
    /// What backs it.
    pub kind: RamKind,
}

impl GuestRam {
    /// Allocates `size` bytes of guest RAM in a memfd (nothing is touched until the guest
    /// uses it): for RAM that is no VM's own (a loader's scratch copy, tests).
    pub fn new(size: u64) -> Result<GuestRam> {
        GuestRam::with_backing(size, RamBacking::Memfd)
    }

    /// Allocates `size` bytes of guest RAM backed as `backing` asks, falling back (logged)
    /// where the host cannot give that; only an explicit `HugeTlb` fails instead.
    pub fn with_backing(size: u64, backing: RamBacking) -> Result<GuestRam> {
        check_size(size)?;
        let pool = match backing {
            RamBacking::Auto | RamBacking::HugeTlb => hugetlb::Pool::read(),
            _ => None,
        };
        let attempts = backing.attempts(size, pool)?;
        let mut last = None;
        for (i, &kind) in attempts.iter().enumerate() {
            match GuestRam::of_kind(size, kind) {
                Ok(ram) => {
                    tracing::debug!("guest RAM: {} MiB ({kind})", size >> 20);
                    return Ok(ram);
                }
                Err(e) if backing == RamBacking::HugeTlb => return Err(pool_lost(size, e)),
                Err(e) => {
                    if let Some(next) = attempts.get(i + 1) {
                        tracing::info!("guest RAM not from the {kind}: {e}; trying a {next}");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| VmmError::MemoryAlloc("no guest RAM backing to try".into())))
    }

    fn of_kind(size: u64, kind: RamKind) -> Result<GuestRam> {
        let file = match kind {
            RamKind::HugeTlb => hugetlb::create(size),
            RamKind::HugeTmpfs => huge_tmpfs::create(size),
            RamKind::Memfd => create_memfd(size).map_err(|e| std::io::Error::other(e.to_string())),
        }
        .map_err(|e| VmmError::MemoryAlloc(e.to_string()))?;
        let memfd = Arc::new(file);
        let mut regions = Vec::new();
        let mut file_offset = 0u64;
        for (start, len) in ram_ranges(size) {
            let len_usize = usize::try_from(len)
                .map_err(|_| VmmError::MemoryAlloc(format!("region of {len} bytes")))?;
            let at = FileOffset::from_arc(memfd.clone(), file_offset);
            let region = if kind == RamKind::HugeTlb {
                // Without MAP_NORESERVE the pool's pages are reserved now: a pool others used
                // up fails here (ENOMEM) rather than SIGBUS on the guest's first touch.
                let mapping = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
                    len_usize,
                    vm_memory::bitmap::NewBitmap::with_len(len_usize),
                )
                .with_file_offset(at)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
                .with_hugetlbfs(true)
                .build()
                .map_err(|e| VmmError::MemoryAlloc(format!("reserving {} MiB: {e}", len >> 20)))?;
                GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or_else(|| {
                    VmmError::MemoryAlloc(format!("region at {start:#x} overflows"))
                })?
            } else {
                GuestRegionMmap::from_range(GuestAddress(start), len_usize, Some(at))
                    .map_err(|e| VmmError::MemoryAlloc(format!("mapping {len} bytes: {e}")))?
            };
            regions.push(region);
            file_offset += len;
        }
        let memory =
            GuestMemory::from_regions(regions).map_err(|e| VmmError::MemoryAlloc(e.to_string()))?;
        Ok(GuestRam {
            memory,
            memfd,
            size,
            kind,
        })
    }

    /// Writes `buf` at file offset `off` without marking anything dirty in vm-memory's bitmap
    /// (a `pwrite`'s semantics: the page then equals what a save holds). A hugetlb file
    /// refuses `write`, so there the bytes go through the mapping.
    pub fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.kind != RamKind::HugeTlb {
            return self.memfd.write_all_at(buf, off);
        }
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                std::io::Error::other(format!(
                    "{} bytes at {off:#x} pass the end of guest RAM ({:#x})",
                    buf.len(),
                    self.size
                ))
            })?;
        let mut region_off = 0u64;
        for (_, len, host) in regions(&self.memory) {
            let (from, to) = (off.max(region_off), end.min(region_off + len));
            if from < to {
                let src = &buf[(from - off) as usize..(to - off) as usize];
                // SAFETY: `from..to` lies inside this region's live mapping (checked against
                // its file range above), and `src` is a separate buffer of that length.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        (host + (from - region_off)) as *mut u8,
                        src.len(),
                    )
                };
            }
            region_off += len;
        }
        Ok(())
    }
}

/// An explicit `hugetlb` whose mapping failed although the pool looked big enough (another
/// process took the pages in between, or a cgroup limit).
fn pool_lost(size: u64, e: VmmError) -> VmmError {
    VmmError::MemoryAlloc(format!(
        "{}=hugetlb: {} MiB of guest RAM could not be reserved in the hugetlb pool ({e}); \
         raise /proc/sys/vm/nr_hugepages (sysctl vm.nr_hugepages) or unset {}",
        RamBacking::ENV,
        size >> 20,
        RamBacking::ENV
    ))
}

/// Whether guest RAM's file holds no page at all in `off..off + len` (`lseek(SEEK_DATA)`); any
/// error answers "not a hole", so a caller never skips data it could not look at. On hugetlbfs
/// `SEEK_DATA` calls the whole file data, so it is never a hole there (correct, not sparse).
pub(crate) fn is_hole(file: &File, off: u64, len: u64) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: plain syscall on a descriptor we own; it moves only the file position, which
    // nothing uses (all I/O on guest RAM is positional).
    let data = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data from `off` to the end of the file.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    data as u64 >= off + len
}

/// `(guest start, length, host address)` of each region, in order (the KVM memory slots).
pub fn regions(mem: &GuestMemory) -> Vec<(u64, u64, u64)> {
    use vm_memory::GuestMemoryBackend;
    mem.iter()
        .map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_ranges(5 << 30);
        assert_eq!(r, vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 5 << 30);
    }

    #[test]
    fn rejects_zero_tiny_and_absurd_sizes() {
        assert!(matches!(
            check_size(0),
            Err(VmmError::MemoryTooSmall { .. })
        ));
        assert!(matches!(
            check_size(1 << 20),
            Err(VmmError::MemoryTooSmall { .. })
        ));
        assert!(matches!(
            check_size(1 << 60),
            Err(VmmError::MemoryTooLarge { .. })
        ));
        assert!(check_size((64 << 20) + 1).is_err());
    }

    #[test]
    fn ram_is_memfd_backed_and_shared() {
        let ram = GuestRam::new(32 << 20).unwrap();
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x10_0000))
            .unwrap();
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 4];
        ram.memfd.read_exact_at(&mut buf, 0x10_0000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.memory.num_regions(), 1);
    }

    #[test]
    fn large_sparse_guest_maps_above_4g() {
        // 4 GiB + 64 MiB of address space costs nothing until touched (memfd + MAP_NORESERVE).
        let size = (4u64 << 30) + (64 << 20);
        if check_size(size).is_err() {
            // How much RAM a host has is no setup's to change: recorded, never a CI failure.
            vireo_testkit::skip_env("a host that can back 4 GiB + 64 MiB of guest RAM");
            return;
        }
        let ram = GuestRam::new(size).unwrap();
        assert_eq!(ram.memory.num_regions(), 2);
        ram.memory
            .write_obj(7u64, GuestAddress(MMIO_HOLE_END + 4096))
            .unwrap();
        assert!(ram
            .memory
            .write_obj(7u64, GuestAddress(MMIO_HOLE_START))
            .is_err());
    }

    const MIB: u64 = 1 << 20;

    fn pool(free: u64, reserved: u64) -> Option<hugetlb::Pool> {
        Some(hugetlb::Pool { free, reserved })
    }

    #[test]
    fn auto_takes_the_pool_only_when_it_holds_the_whole_guest() {
        use RamKind::*;
        let auto = RamBacking::Auto;
        assert_eq!(
            auto.attempts(64 * MIB, pool(32, 0)).unwrap(),
            &[HugeTlb, HugeTmpfs, Memfd]
        );
        assert_eq!(
            auto.attempts(64 * MIB, pool(31, 0)).unwrap(),
            &[HugeTmpfs, Memfd]
        );
        assert_eq!(auto.attempts(64 * MIB, None).unwrap(), &[HugeTmpfs, Memfd]);
        assert_eq!(
            RamBacking::Memfd.attempts(64 * MIB, pool(512, 0)).unwrap(),
            &[Memfd]
        );
        assert_eq!(
            RamBacking::Huge.attempts(64 * MIB, pool(512, 0)).unwrap(),
            &[HugeTmpfs, Memfd]
        );
    }

    #[test]
    fn explicit_hugetlb_on_a_short_pool_names_the_sysctl() {
        let e = RamBacking::HugeTlb
            .attempts(64 * MIB, pool(40, 10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs 32 free 2 MiB pages"), "{e}");
        assert!(e.contains("40 free (10 of them reserved)"), "{e}");
        assert!(e.contains("/proc/sys/vm/nr_hugepages"), "{e}");
        let e = RamBacking::HugeTlb
            .attempts(65 * MIB, pool(512, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole 2 MiB pages"), "{e}");
        let e = RamBacking::HugeTlb
            .attempts(64 * MIB, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no 2 MiB pool"), "{e}");
    }

    #[test]
    fn lazy_fills_never_land_on_the_pool() {
        assert_eq!(RamBacking::Auto.for_userfaultfd(), RamBacking::Huge);
        assert_eq!(RamBacking::HugeTlb.for_userfaultfd(), RamBacking::HugeTlb);
        assert_eq!(RamBacking::Memfd.for_userfaultfd(), RamBacking::Memfd);
    }

    /// Pages in the whole pool (0: no pool, which no test here can change).
    fn pool_total() -> u64 {
        std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `size` bytes from the pool; other tests' VMs share it, so a short pool is waited for
    /// (bounded) until they give pages back. `None`: no pool on this host (a recorded skip).
    fn from_the_pool(size: u64) -> Option<GuestRam> {
        if pool_total() < size / hugetlb::HUGE_PAGE {
            vireo_testkit::skip_env(
                "a hugetlb pool (./setup.sh reserves one where /proc/sys/vm/nr_hugepages is writable)",
            );
            return None;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match GuestRam::with_backing(size, RamBacking::HugeTlb) {
                Ok(ram) => return Some(ram),
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("the hugetlb pool stayed short for 60 s: {e}")
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    }

    #[test]
    fn ram_from_the_pool_reads_writes_and_zeroes_like_a_file() {
        let Some(ram) = from_the_pool(16 * MIB) else {
            return;
        };
        assert_eq!(ram.kind, RamKind::HugeTlb);
        let host = regions(&ram.memory)[0].2;
        assert_eq!(host % hugetlb::HUGE_PAGE, 0);
        // The file refuses pwrite; `write_at` goes through the mapping and marks nothing dirty.
        use std::os::unix::fs::FileExt;
        assert!(ram.memfd.write_all_at(&[1], 0).is_err());
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8 + 1).collect();
        let at = 2 * MIB - 4096; // across a 2 MiB page boundary
        ram.write_at(&data, at).unwrap();
        let mut back = vec![0u8; data.len()];
        ram.memfd.read_exact_at(&mut back, at).unwrap();
        assert_eq!(back, data);
        assert!(ram.write_at(&[0; 2], 16 * MIB - 1).is_err());
        // A 4 KiB hole punch zeroes just that page inside a huge one.
        // SAFETY: plain syscall on our descriptor; no memory passed.
        let r = unsafe {
            libc::fallocate(
                std::os::unix::io::AsRawFd::as_raw_fd(&*ram.memfd),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (2 * MIB) as libc::off_t,
                4096,
            )
        };
        assert_eq!(r, 0);
        ram.memfd.read_exact_at(&mut back, at).unwrap();
        assert_eq!(back[..4096], data[..4096]);
        assert!(back[4096..8192].iter().all(|&b| b == 0));
        assert_eq!(back[8192..], data[8192..]);
        // SEEK_DATA calls it all data: nothing is ever skipped as a hole.
        assert!(!is_hole(&ram.memfd, 8 * MIB, 2 * MIB));
    }

    #[test]
    fn a_guest_bigger_than_the_pool_gets_huge_tmpfs_and_no_sigbus() {
        // Bigger than the whole pool, however many pages others hold right now.
        let size = (pool_total() + 8) * hugetlb::HUGE_PAGE;
        if check_size(size).is_err() {
            vireo_testkit::skip_env("a host that can back a guest bigger than its hugetlb pool");
            return;
        }
        let ram = GuestRam::with_backing(size, RamBacking::Auto).unwrap();
        assert_ne!(ram.kind, RamKind::HugeTlb);
        // Mapping the pool's file reserves its pages: a short pool fails here, with ENOMEM,
        // not on a touch later.
        if pool_total() > 0 {
            let e = GuestRam::of_kind(size, RamKind::HugeTlb).err().unwrap();
            assert!(e.to_string().contains("reserving"), "{e}");
        }
    }
}
