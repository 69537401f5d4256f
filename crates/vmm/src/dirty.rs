//! Dirty-page tracking: KVM's log of pages the guest wrote, merged with vm-memory's bitmap of
//! pages the VMM wrote (virtio rings, device DMA into guest buffers) and with the shared log
//! other processes that write guest RAM mark (vhost-user back ends: the switch writes received
//! frames and used rings). Migration and live save need all three.
//!
//! The shared log ([`SharedLog`]) exists only while logging is on: a memfd with one bit per
//! 4 KiB guest page from address 0, handed to every device at [`DirtyTracker::start`]
//! (`VirtioDevice::start_dirty_log`; a vhost-user NIC sends it to its back end with
//! `SET_LOG_BASE`). Back ends set bits with atomic ORs; we take them with atomic swaps (or
//! `fetch_and` for a word shared with another region), so a bit set during a fetch lands in
//! this fetch or the next, never nowhere.
//!
//! **Manual protection** (live migration, [`LogMode::ClearAsCopied`]): with
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` a fetch (`KVM_GET_DIRTY_LOG`) no longer write-protects
//! every page it reports again. Starting the log still protects everything at once (one bulk
//! walk; `KVM_DIRTY_LOG_INITIALLY_SET` would instead need a clear per region during the full
//! pass, which measured slower here). The copier re-protects each 2 MiB region with
//! [`DirtyTracker::clear_region`] right before it reads that region's fetched pages: a page the
//! guest writes between the fetch and its copy costs it no fault (each first write after a
//! protection is a slow fault under KVM-PVM), and the pages of the last fetch (the pause's)
//! are never protected again. A page whose region was not cleared stays dirty in KVM's log and
//! is reported again: copying too much, never too little. The full pass clears each region
//! too, every page of it: only the pages the guest wrote since the log started are protected
//! again, so one written before the pass reached it goes once, as written, not a second time
//! in the next round (the bench's hot case sent ~15 % fewer bytes in all).
//!
//! Locking: `logging` is held across start/stop/fetch/clear; device transports are locked
//! inside it (nothing locks them in the other order).

use std::fs::File;
use std::os::fd::{AsFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryBackend;

use crate::devices::bus::lock;
use crate::error::{Result, VmmError};
use crate::memory::PAGE_SIZE;
use crate::virtio_mmio::MmioTransport;
use crate::GuestMemory;

/// One KVM memory slot (one guest RAM region).
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: u64,
}

/// Dirty pages of each RAM region: bit `i` of word `i / 64` = page `i` of the region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// `(region guest start, bitmap words)`, one entry per region in address order.
    pub regions: Vec<(u64, Vec<u64>)>,
}

impl DirtyBitmap {
    /// Guest-physical addresses of the dirty pages, ascending.
    pub fn pages(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (start, words) in &self.regions {
            for (w, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    out.push(start + (w as u64 * 64 + b) * PAGE_SIZE);
                    bits &= bits - 1;
                }
            }
        }
        out
    }

    pub fn count(&self) -> usize {
        self.regions
            .iter()
            .flat_map(|(_, w)| w.iter())
            .map(|w| w.count_ones() as usize)
            .sum()
    }
}

/// The dirty log shared with back ends in other processes (module docs).
pub struct SharedLog {
    file: File,
    map: vm_memory::MmapRegion,
    words: usize,
}

impl SharedLog {
    /// A zeroed log covering guest-physical pages below `end`.
    pub fn new(end: u64) -> Result<SharedLog> {
        let words = end.div_ceil(PAGE_SIZE).div_ceil(64).max(1) as usize;
        let size = words * 8;
        let err = |what: &str, e: std::io::Error| {
            VmmError::DirtyLog(format!("creating the shared dirty log: {what}: {e}"))
        };
        // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
        let fd = unsafe { libc::memfd_create(c"vireo-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(err("memfd_create", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a freshly created descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)
            .map_err(|e| err("sizing the log memfd", e))?;
        let map = vm_memory::MmapRegion::from_file(
            vm_memory::FileOffset::new(file.try_clone().map_err(|e| err("dup", e))?, 0),
            size,
        )
        .map_err(|e| VmmError::DirtyLog(format!("mapping the shared dirty log: {e}")))?;
        Ok(SharedLog { file, map, words })
    }

    /// The log as devices get it.
    pub fn as_dirty_log(&self) -> vireo_virtio::DirtyLog<'_> {
        vireo_virtio::DirtyLog {
            fd: self.file.as_fd(),
            size: (self.words * 8) as u64,
        }
    }

    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `words * 8` bytes, page-aligned, shared and writable, and
        // lives as long as `self`; other processes only touch it with atomic operations.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr() as *const AtomicU64, self.words) }
    }
}

/// Takes (and clears) the bits of pages `first .. first + count` from `log`, returned as a
/// bitmap whose bit 0 is page `first`. Bits outside the range, in the same words, stay.
pub fn take_range(log: &[AtomicU64], first: u64, count: u64) -> Vec<u64> {
    let mut out = vec![0u64; count.div_ceil(64) as usize];
    let (mut p, end) = (first, first + count);
    while p < end {
        let Some(word) = log.get((p / 64) as usize) else {
            break;
        };
        let bit = p % 64;
        let n = (64 - bit).min(end - p);
        let mask = if n == 64 {
            !0
        } else {
            ((1u64 << n) - 1) << bit
        };
        let got = if mask == !0 {
            word.swap(0, Ordering::AcqRel)
        } else {
            word.fetch_and(!mask, Ordering::AcqRel) & mask
        } >> bit;
        let rel = p - first;
        let (w, shift) = ((rel / 64) as usize, rel % 64);
        out[w] |= got << shift;
        if shift != 0 && n > 64 - shift {
            out[w + 1] |= got >> (64 - shift);
        }
        p += n;
    }
    out
}

/// How KVM's part of the log is cleared (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogMode {
    /// Each fetch write-protects the pages it reports (KVM's classic dirty log).
    ClearOnFetch,
    /// A fetch protects nothing; [`DirtyTracker::clear_region`] protects a region's fetched
    /// pages right before they are copied.
    ClearAsCopied,
}

impl LogMode {
    /// The environment variable that picks the log for migrations: `as-copied` (the
    /// default) or `on-fetch` (KVM's classic log).
    pub const ENV: &'static str = "VIREO_DIRTY_CLEAR";

    /// What a live migration uses: manual protection unless the environment asks for the
    /// classic log. On this host (KVM-PVM) a write-protect fault is slow, and the classic log
    /// protects the guest's whole hot set at every fetch: the guest's counter stalled through
    /// each dirty round and the pause that followed. Measured idle (docs/migration-performance.md,
    /// "The guest's vCPU during pre-copy", session 30): the hot case's gap, medians of three
    /// invocations of five runs, 17.2 / 13.5 / 20.2 ms classic against 10.8 / 9.1 / 9.8 ms.
    pub fn for_migration() -> LogMode {
        match std::env::var(Self::ENV).as_deref() {
            Ok("on-fetch") => LogMode::ClearOnFetch,
            Ok("as-copied") | Err(_) => LogMode::ClearAsCopied,
            Ok(other) => {
                tracing::warn!(
                    "{}={other:?} is not a dirty-log mode (as-copied, on-fetch): using as-copied",
                    Self::ENV
                );
                LogMode::ClearAsCopied
            }
        }
    }
}

/// The log that is on: the shared log, and whether KVM's part is manually protected.
struct Logging {
    shared: SharedLog,
    manual: bool,
}

/// Turns logging on and off for all RAM slots and devices and reads/clears the merged log.
pub struct DirtyTracker {
    slots: Vec<Slot>,
    /// The devices told when logging starts and stops.
    devices: Vec<Arc<Mutex<MmioTransport>>>,
    /// `Some` while logging is on.
    logging: Mutex<Option<Logging>>,
}

impl DirtyTracker {
    pub fn new(slots: Vec<Slot>) -> Self {
        DirtyTracker {
            slots,
            devices: Vec::new(),
            logging: Mutex::new(None),
        }
    }

    /// The devices whose writes from other processes must be logged too.
    pub fn set_devices(&mut self, devices: Vec<Arc<Mutex<MmioTransport>>>) {
        self.devices = devices;
    }

    /// Registers every slot with KVM (used at VM creation too).
    pub fn set_slots(&self, vm: &VmFd, log: bool) -> Result<()> {
        for s in &self.slots {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: s.guest_addr,
                memory_size: s.size,
                userspace_addr: s.host_addr,
            };
            // SAFETY: the region maps guest RAM that stays mapped (owned by the VM's
            // GuestMemory) for as long as the VM fd exists.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(VmmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Starts logging; the next fetch reports pages written from now on. Fails, with logging
    /// off, when a device cannot log its writes (e.g. a vhost-user back end without
    /// `VHOST_USER_PROTOCOL_F_LOG_SHMFD`): a copy made from this log would miss them.
    pub fn start(&self, vm: &VmFd, mem: &GuestMemory) -> Result<()> {
        self.start_with(vm, mem, LogMode::ClearOnFetch)
    }

    /// [`DirtyTracker::start`] in `mode`. A KVM without manual protection logs as
    /// `ClearOnFetch` (then [`DirtyTracker::clear_region`] does nothing).
    pub fn start_with(&self, vm: &VmFd, mem: &GuestMemory, mode: LogMode) -> Result<()> {
        let mut logging = self.logging.lock().unwrap_or_else(|p| p.into_inner());
        if logging.is_some() {
            self.stop_devices();
        }
        *logging = None;
        let manual = set_manual_protect(vm, mode == LogMode::ClearAsCopied);
        let end = self
            .slots
            .iter()
            .map(|s| s.guest_addr + s.size)
            .max()
            .unwrap_or(0);
        let shared = SharedLog::new(end)?;
        for (i, t) in self.devices.iter().enumerate() {
            if let Err(e) = lock(t).start_dirty_log(shared.as_dirty_log()) {
                for t in &self.devices[..i] {
                    lock(t).stop_dirty_log();
                }
                return Err(VmmError::DirtyLog(format!(
                    "virtio device {i} cannot log the memory it writes: {e}"
                )));
            }
        }
        if let Err(e) = self.set_slots(vm, true) {
            self.stop_devices();
            return Err(e);
        }
        for r in mem.iter() {
            vmm_bitmap(r).reset();
        }
        *logging = Some(Logging { shared, manual });
        Ok(())
    }

    /// Manual protection: write-protects the pages of `[gpa, gpa + len)` that `dirty` holds
    /// (`None`: every page of the range) and clears their bits in KVM's log, so writes from
    /// now on are logged anew. Call right before copying them, at most once per pass for a
    /// page (a second clear after the copy would lose the writes made since). Does nothing
    /// with logging off or not manual.
    pub fn clear_region(
        &self,
        vm: &VmFd,
        dirty: Option<&DirtyBitmap>,
        gpa: u64,
        len: u64,
    ) -> Result<()> {
        let logging = self.logging.lock().unwrap_or_else(|p| p.into_inner());
        if !logging.as_ref().is_some_and(|l| l.manual) {
            return Ok(());
        }
        for (i, s) in self.slots.iter().enumerate() {
            let start = gpa.max(s.guest_addr);
            let end = (gpa + len).min(s.guest_addr + s.size);
            if start >= end {
                continue;
            }
            let words = dirty.and_then(|d| d.regions.get(i).map(|(_, w)| w.as_slice()));
            let (first, num, bits) = clear_window(
                words,
                (start - s.guest_addr) / PAGE_SIZE,
                (end - start) / PAGE_SIZE,
                s.size / PAGE_SIZE,
            );
            if bits.iter().all(|&w| w == 0) {
                continue;
            }
            clear_dirty_log(vm, s.slot, first, num, &bits)
                .map_err(VmmError::kvm("KVM_CLEAR_DIRTY_LOG"))?;
        }
        Ok(())
    }

    /// Stops logging and registers every slot anew (deleted, then added without the log), so
    /// KVM drops every mapping the log had write-protected: the guest's next access to each
    /// page is an ordinary fault, which KVM serves for several neighbouring pages at once.
    pub fn stop_and_remap(&self, vm: &VmFd) -> Result<()> {
        let mut logging = self.logging.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = logging.take() {
            self.stop_devices();
            if l.manual {
                set_manual_protect(vm, false);
            }
        }
        for s in &self.slots {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags: 0,
                guest_phys_addr: s.guest_addr,
                memory_size: 0,
                userspace_addr: s.host_addr,
            };
            // SAFETY: size 0 deletes the slot; nothing is mapped by it.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(VmmError::kvm("KVM_SET_USER_MEMORY_REGION (delete)"))?;
        }
        self.set_slots(vm, false)
    }

    /// Whether logging is on (started and not stopped since).
    pub fn is_logging(&self) -> bool {
        self.logging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn stop_devices(&self) {
        for t in &self.devices {
            lock(t).stop_dirty_log();
        }
    }

    pub fn stop(&self, vm: &VmFd) -> Result<()> {
        let mut logging = self.logging.lock().unwrap_or_else(|p| p.into_inner());
        let manual = logging.take().is_some_and(|l| {
            self.stop_devices();
            l.manual
        });
        self.set_slots(vm, false)?;
        if manual {
            set_manual_protect(vm, false);
        }
        Ok(())
    }

    /// Returns the pages written since the last start/fetch (by the guest, the VMM or a
    /// device's back end), and clears the log (manual protection: all but KVM's part, which
    /// [`DirtyTracker::clear_region`] clears as the pages are copied).
    pub fn fetch_and_clear(&self, vm: &VmFd, mem: &GuestMemory) -> Result<DirtyBitmap> {
        let logging = self.logging.lock().unwrap_or_else(|p| p.into_inner());
        let Some(Logging { shared, .. }) = logging.as_ref() else {
            return Err(VmmError::DirtyLog(
                "dirty logging is not started".to_string(),
            ));
        };
        let mut out = DirtyBitmap::default();
        for (s, region) in self.slots.iter().zip(mem.iter()) {
            let mut words = vm
                .get_dirty_log(s.slot, s.size as usize)
                .map_err(VmmError::kvm("KVM_GET_DIRTY_LOG"))?;
            merge(&mut words, &vmm_bitmap(region).get_and_reset());
            let pages = s.size / PAGE_SIZE;
            merge(
                &mut words,
                &take_range(shared.words(), s.guest_addr / PAGE_SIZE, pages),
            );
            out.regions.push((s.guest_addr, words));
        }
        Ok(out)
    }
}

/// Turns KVM's manual protection on or off for the VM. Whether it is on afterwards.
fn set_manual_protect(vm: &VmFd, on: bool) -> bool {
    use kvm_bindings::{
        kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    };
    let wanted = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
    let offered = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
    if offered < 0 || (offered as u32 & wanted) != wanted {
        return false;
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = if on { wanted.into() } else { 0 };
    match vm.enable_cap(&cap) {
        Ok(()) => on,
        Err(e) => {
            tracing::warn!("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2, {on}): {e}");
            false
        }
    }
}

/// The `KVM_CLEAR_DIRTY_LOG` window for pages `first .. first + count` of a slot of
/// `slot_pages` pages: KVM wants it to start on a multiple of 64 pages and span a multiple of
/// 64 (or run to the slot's end). Returns `(first page, pages, bitmap)`, the bitmap holding
/// only the range's pages of `words` (`None`: all of them) so neighbours outside it stay
/// dirty.
fn clear_window(
    words: Option<&[u64]>,
    first: u64,
    count: u64,
    slot_pages: u64,
) -> (u64, u64, Vec<u64>) {
    let start = first / 64 * 64;
    let end = (first + count).div_ceil(64) * 64;
    let num = end.min(slot_pages) - start;
    let mut bits = vec![0u64; num.div_ceil(64) as usize];
    for (i, out) in bits.iter_mut().enumerate() {
        let word_first = start + i as u64 * 64;
        let lo = first.saturating_sub(word_first).min(64);
        let hi = (first + count).saturating_sub(word_first).min(64);
        if lo >= hi {
            continue;
        }
        let mask = if hi - lo == 64 {
            !0
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        let have = words.map_or(!0, |w| {
            w.get((word_first / 64) as usize).copied().unwrap_or(0)
        });
        *out = have & mask;
    }
    (start, num, bits)
}

/// `KVM_CLEAR_DIRTY_LOG` (kvm-ioctls has no wrapper for it).
fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first: u64,
    num: u64,
    bits: &[u64],
) -> std::result::Result<(), kvm_ioctls::Error> {
    use std::os::fd::AsRawFd;
    let mut arg = kvm_bindings::kvm_clear_dirty_log {
        slot,
        num_pages: num as u32,
        first_page: first,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bits.as_ptr() as *mut libc::c_void;
    // _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)
    const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = (3 << 30)
        | ((std::mem::size_of::<kvm_bindings::kvm_clear_dirty_log>() as libc::c_ulong) << 16)
        | (0xAE << 8)
        | 0xc0;
    // SAFETY: `arg` is a valid kvm_clear_dirty_log whose bitmap points at `bits`, which holds
    // at least `num` bits (`clear_window` sizes it) and outlives the call; KVM only reads it.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &arg) };
    if r < 0 {
        return Err(kvm_ioctls::Error::last());
    }
    Ok(())
}

/// The region's whole-region bitmap of VMM writes (not the sliced view `GuestMemoryRegion`
/// exposes).
pub(crate) fn vmm_bitmap(
    region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
) -> &vm_memory::bitmap::AtomicBitmap {
    let mapping: &vm_memory::MmapRegion<_> = region;
    mapping.bitmap()
}

/// ORs `vmm` into `kvm` (both one bit per page).
fn merge(kvm: &mut Vec<u64>, vmm: &[u64]) {
    if kvm.len() < vmm.len() {
        kvm.resize(vmm.len(), 0);
    }
    for (k, v) in kvm.iter_mut().zip(vmm) {
        *k |= v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn bitmap_to_pages() {
        let b = DirtyBitmap {
            regions: vec![(0, vec![0b101, 1 << 63]), (1 << 32, vec![1])],
        };
        assert_eq!(b.pages(), vec![0, 2 * 4096, 127 * 4096, 1 << 32]);
        assert_eq!(b.count(), 4);
    }

    #[test]
    fn take_range_takes_and_clears_only_the_region_bits() {
        let log: Vec<AtomicU64> = [u64::MAX, 0b1011, 1 << 63]
            .into_iter()
            .map(AtomicU64::new)
            .collect();
        // Pages 62..130: the last 2 bits of word 0, all of word 1, bit 0..1 of word 2.
        let got = take_range(&log, 62, 68);
        assert_eq!(got.len(), 2);
        // Region-relative: pages 62, 63 -> bits 0, 1; word 1's 0b1011 -> bits 2, 3, 5.
        assert_eq!(got[0], 0b11 | (0b1011 << 2));
        assert_eq!(got[1], 0, "page 191 lies outside the range");
        assert_eq!(
            log[0].load(Ordering::Relaxed),
            u64::MAX >> 2,
            "pages 0..62 stay"
        );
        assert_eq!(log[1].load(Ordering::Relaxed), 0);
        assert_eq!(log[2].load(Ordering::Relaxed), 1 << 63, "page 191 stays");
        // Taken once: a second fetch sees nothing, a new bit is seen once.
        assert_eq!(take_range(&log, 62, 68), vec![0, 0]);
        log[2].fetch_or(1, Ordering::Relaxed); // page 128 = region page 66
        assert_eq!(take_range(&log, 62, 68), vec![0, 1 << 2]);
        // Beyond the end of the log: nothing, no panic.
        assert_eq!(take_range(&log, 1000, 64), vec![0]);
    }

    #[test]
    fn shared_log_bits_merge_into_the_fetched_bitmap() {
        // A region at 1 MiB (page 256, word 4): what a back end in another process marked
        // through the memfd shows up at the right guest addresses.
        let log = SharedLog::new(2 << 20).unwrap();
        assert_eq!(log.words().len(), 8);
        let map = vm_memory::MmapRegion::<()>::from_file(
            vm_memory::FileOffset::new(log.file.try_clone().unwrap(), 0),
            64,
        )
        .unwrap();
        // SAFETY: a second shared mapping of the same 64 bytes, as the back end has it.
        let other = unsafe { std::slice::from_raw_parts(map.as_ptr() as *const AtomicU64, 8) };
        other[4].fetch_or(1 << 3, Ordering::Relaxed); // page 259 = 0x103000
        other[7].fetch_or(1 << 63, Ordering::Relaxed); // page 511 = 0x1ff000
        let mut kvm = vec![1u64, 0, 0, 0]; // the guest wrote page 256
        merge(&mut kvm, &take_range(log.words(), 256, 256));
        let b = DirtyBitmap {
            regions: vec![(1 << 20, kvm)],
        };
        assert_eq!(b.pages(), vec![0x100000, 0x103000, 0x1ff000]);
        assert!(other.iter().all(|w| w.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn clear_windows_are_64_page_aligned_and_hold_only_the_range() {
        // A 2 MiB region (512 pages) at page 512 of a 65536-page slot: aligned already.
        let mut words = vec![0u64; 1024];
        words[8] = 0b1010; // pages 515, 513
        words[15] = 1 << 63; // page 1023
        words[16] = 1; // page 1024: the next region, not cleared
        let (first, num, bits) = clear_window(Some(&words), 512, 512, 65536);
        assert_eq!((first, num), (512, 512));
        assert_eq!(bits.len(), 8);
        assert_eq!(bits[0], 0b1010);
        assert_eq!(bits[7], 1 << 63);
        // Unaligned range: rounded out to whole words, neighbours masked off.
        let (first, num, bits) = clear_window(None, 70, 60, 65536);
        assert_eq!((first, num), (64, 128));
        assert_eq!(bits[0], !0u64 << 6, "pages 70..128");
        assert_eq!(bits[1], (1u64 << 2) - 1, "pages 128..130");
        // A slot whose size is not a multiple of 64 pages: the window stops at its end.
        let (first, num, bits) = clear_window(None, 64, 36, 100);
        assert_eq!((first, num), (64, 36));
        assert_eq!(bits, vec![(1u64 << 36) - 1]);
    }

    #[test]
    fn merge_ors_and_extends() {
        let mut k = vec![1];
        merge(&mut k, &[2, 4]);
        assert_eq!(k, vec![3, 4]);
    }

    #[test]
    fn vmm_writes_through_guest_memory_are_recorded() {
        // What virtio devices do: write into guest buffers through GuestMemory.
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        for r in mem.iter() {
            vmm_bitmap(r).reset();
        }
        mem.write_slice(&[1u8; 10], GuestAddress(0x90_0000 + 4090))
            .unwrap(); // straddles two pages
        mem.write_obj(5u16, GuestAddress(0xa0_0000)).unwrap();
        let region = mem.iter().next().unwrap();
        let mut words = vec![0u64; (16 << 20) / 4096 / 64];
        merge(&mut words, &vmm_bitmap(region).get_and_reset());
        let b = DirtyBitmap {
            regions: vec![(0, words)],
        };
        assert_eq!(b.pages(), vec![0x90_0000, 0x90_1000, 0xa0_0000]);
        assert_eq!(vmm_bitmap(region).get_and_reset().iter().sum::<u64>(), 0);
    }
}
