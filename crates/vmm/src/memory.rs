//! Guest RAM: one shmem file mapped shared (so it can be handed to vhost-user back ends,
//! snapshotted or migrated), split around the 32-bit MMIO hole, with vm-memory's per-page bitmap
//! recording every byte the VMM itself writes. The file is on a private huge-page tmpfs
//! (`huge_tmpfs.rs`, [`RamBacking::Huge`], the default) or a memfd (where that mount is not
//! allowed, or asked for); everything else sees the same `File` either way and calls it the
//! memfd.

use std::fs::File;
use std::os::unix::io::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap};

use crate::error::{Result, VmmError};
use crate::GuestMemory;

mod huge_tmpfs;

/// What guest RAM is backed by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RamBacking {
    /// A memfd: host pages of 4 KiB unless the host enables shmem huge pages (this one does
    /// not), so KVM maps the guest 4 KiB at a time, and every time KVM drops its mappings (the
    /// dirty log going off after an in-place apply, a migration's resume) the guest pays one
    /// fault per 4 KiB it touches next. The least memory for a guest that touches its RAM
    /// sparsely.
    Memfd,
    /// 2 MiB host pages wherever the file holds data, so KVM maps 2 MiB at a time where the
    /// guest's own page tables do (Linux's direct map, the probe's identity map): measured,
    /// a guest rewriting 64 MiB runs again after an in-place apply several times sooner
    /// (docs/vm-state.md, "In-place apply"). A 2 MiB region with a single page written costs
    /// 2 MiB. Needs CAP_SYS_ADMIN (a private tmpfs); without it, a memfd.
    #[default]
    Huge,
}

impl RamBacking {
    /// The environment variable that overrides the default: `memfd` or `huge`.
    pub const ENV: &'static str = "VIREO_GUEST_RAM";

    /// The default, or what `VIREO_GUEST_RAM` asks for (`memfd` for 4 KiB pages: an A/B
    /// measurement, or a host short of memory). Any other value is refused with its name.
    pub fn from_env() -> std::result::Result<RamBacking, String> {
        match std::env::var(Self::ENV) {
            Err(_) => Ok(RamBacking::default()),
            Ok(v) if v == "memfd" => Ok(RamBacking::Memfd),
            Ok(v) if v == "huge" => Ok(RamBacking::Huge),
            Ok(v) => Err(format!(
                "{}={v:?} is not a guest RAM backing; use `huge` (2 MiB pages, the default) \
                 or `memfd` (4 KiB pages)",
                Self::ENV
            )),
        }
    }
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
}

impl GuestRam {
    /// Allocates `size` bytes of guest RAM in a memfd (nothing is touched until the guest
    /// uses it): for RAM that is no VM's own (a loader's scratch copy, tests).
    pub fn new(size: u64) -> Result<GuestRam> {
        GuestRam::with_backing(size, RamBacking::Memfd)
    }

    /// Allocates `size` bytes of guest RAM backed as `backing` asks, or by a memfd where the
    /// host cannot give that (logged).
    pub fn with_backing(size: u64, backing: RamBacking) -> Result<GuestRam> {
        check_size(size)?;
        let file = match backing {
            RamBacking::Memfd => create_memfd(size)?,
            RamBacking::Huge => match huge_tmpfs::create(size) {
                Ok(f) => {
                    tracing::debug!("guest RAM: {} MiB on a private huge-page tmpfs", size >> 20);
                    f
                }
                Err(e) => {
                    tracing::info!("guest RAM in 4 KiB pages (a memfd): no huge-page tmpfs: {e}");
                    create_memfd(size)?
                }
            },
        };
        let memfd = Arc::new(file);
        let mut regions = Vec::new();
        let mut file_offset = 0u64;
        for (start, len) in ram_ranges(size) {
            let len_usize = usize::try_from(len)
                .map_err(|_| VmmError::MemoryAlloc(format!("region of {len} bytes")))?;
            let region = GuestRegionMmap::from_range(
                GuestAddress(start),
                len_usize,
                Some(FileOffset::from_arc(memfd.clone(), file_offset)),
            )
            .map_err(|e| VmmError::MemoryAlloc(format!("mapping {len} bytes: {e}")))?;
            regions.push(region);
            file_offset += len;
        }
        let memory =
            GuestMemory::from_regions(regions).map_err(|e| VmmError::MemoryAlloc(e.to_string()))?;
        Ok(GuestRam {
            memory,
            memfd,
            size,
        })
    }
}

/// Whether guest RAM's file holds no page at all in `off..off + len` (`lseek(SEEK_DATA)`); any
/// error answers "not a hole", so a caller never skips data it could not look at.
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
}
