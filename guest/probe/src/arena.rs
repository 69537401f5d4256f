//! A bump allocator over a static region for virtqueues and device buffers. The probe's memory
//! is identity-mapped, so an address here is also the guest-physical address devices use.

use core::ptr::addr_of_mut;

/// Room for 4 NICs of one pair and a few dozen disks, or fewer NICs of up to 4 pairs each
/// (~260 KiB per pair); the image must still end below 8 MiB (linker.ld checks).
const ARENA_SIZE: usize = 4 << 20;

#[repr(C, align(4096))]
struct Region([u8; ARENA_SIZE]);

static mut REGION: Region = Region([0; ARENA_SIZE]);
static mut USED: usize = 0;

/// Returns a zeroed, `align`-aligned block of `size` bytes, or None when the arena is full.
pub fn alloc(size: usize, align: usize) -> Option<u64> {
    // SAFETY: the probe is single-threaded on the BSP (APs never allocate); the region is only
    // handed out once, so no two users alias a block.
    unsafe {
        let base = addr_of_mut!(REGION) as usize;
        let start = (base + USED).next_multiple_of(align);
        let end = start.checked_add(size)?;
        if end > base + ARENA_SIZE {
            return None;
        }
        USED = end - base;
        core::ptr::write_bytes(start as *mut u8, 0, size);
        Some(start as u64)
    }
}
