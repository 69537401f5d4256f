//! Dirty-page tracking: KVM's log of pages the guest wrote, merged with vm-memory's bitmap of
//! pages the VMM wrote (virtio rings, device DMA into guest buffers). Migration needs both.

use std::sync::Mutex;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryBackend;

use crate::error::{Result, VmmError};
use crate::memory::PAGE_SIZE;
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

/// Turns logging on and off for all RAM slots and reads/clears the merged log.
pub struct DirtyTracker {
    slots: Vec<Slot>,
    logging: Mutex<bool>,
}

impl DirtyTracker {
    pub fn new(slots: Vec<Slot>) -> Self {
        DirtyTracker {
            slots,
            logging: Mutex::new(false),
        }
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

    /// Starts logging; the next fetch reports pages written from now on.
    pub fn start(&self, vm: &VmFd, mem: &GuestMemory) -> Result<()> {
        let mut logging = self.logging.lock().unwrap_or_else(|p| p.into_inner());
        self.set_slots(vm, true)?;
        for r in mem.iter() {
            vmm_bitmap(r).reset();
        }
        *logging = true;
        Ok(())
    }

    pub fn stop(&self, vm: &VmFd) -> Result<()> {
        let mut logging = self.logging.lock().unwrap_or_else(|p| p.into_inner());
        self.set_slots(vm, false)?;
        *logging = false;
        Ok(())
    }

    /// Returns the pages written since the last start/fetch, and clears the log.
    pub fn fetch_and_clear(&self, vm: &VmFd, mem: &GuestMemory) -> Result<DirtyBitmap> {
        let logging = self.logging.lock().unwrap_or_else(|p| p.into_inner());
        if !*logging {
            return Err(VmmError::BootSetup(
                "dirty logging is not started".to_string(),
            ));
        }
        let mut out = DirtyBitmap::default();
        for (s, region) in self.slots.iter().zip(mem.iter()) {
            let mut words = vm
                .get_dirty_log(s.slot, s.size as usize)
                .map_err(VmmError::kvm("KVM_GET_DIRTY_LOG"))?;
            merge(&mut words, &vmm_bitmap(region).get_and_reset());
            out.regions.push((s.guest_addr, words));
        }
        Ok(out)
    }
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
