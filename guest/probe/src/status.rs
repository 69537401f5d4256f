//! The status page at GPA 0x80000 that the host may read at any time, and the secondary vCPUs'
//! life: register in "vCPUs online", then bump a heartbeat forever.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};

pub const STATUS_GPA: u64 = 0x80000;
const MAGIC: [u8; 8] = *b"PROBESTA";
const OFF_DIRTY_PASSES: u64 = 8;
const OFF_ONLINE: u64 = 16;
const OFF_DIRTY_PAGES: u64 = 24;
const OFF_HEARTBEAT: u64 = 64;
pub const MAX_CPUS: usize = 32;

fn word(offset: u64) -> *mut u64 {
    (STATUS_GPA + offset) as *mut u64
}

/// Called once by the boot vCPU after it has copied what the loader gave it.
pub fn init_by_bsp() {
    // SAFETY: the status page is probe-owned memory (docs/probe-protocol.md); APs only write it
    // after seeing the magic, which is written last.
    unsafe {
        core::ptr::write_bytes(STATUS_GPA as *mut u8, 0, 4096);
        write_volatile(word(OFF_ONLINE), 1);
        core::sync::atomic::fence(Ordering::SeqCst);
        write_volatile(STATUS_GPA as *mut [u8; 8], MAGIC);
    }
}

fn ready() -> bool {
    // SAFETY: reading probe-owned memory.
    unsafe { read_volatile(STATUS_GPA as *const [u8; 8]) == MAGIC }
}

pub fn online() -> u64 {
    // SAFETY: reading probe-owned memory.
    unsafe { read_volatile(word(OFF_ONLINE)) }
}

/// Counts one completed dirty pass; the counter never goes back, across DIRTY runs too.
pub fn bump_dirty_passes() {
    // SAFETY: only the BSP writes this word.
    unsafe {
        write_volatile(
            word(OFF_DIRTY_PASSES),
            read_volatile(word(OFF_DIRTY_PASSES)) + 1,
        )
    }
}

/// Counts `n` more pages written by the dirty workload. Updated after every page, so a host
/// watching it sees a stall of the guest (a migration's pause) to within one page write
/// (~0.2 µs flat out, ~25 µs when the write faults), where the pass counter moves once per pass.
pub fn add_dirty_pages(n: u64) {
    // SAFETY: only the BSP writes this word.
    unsafe {
        write_volatile(
            word(OFF_DIRTY_PAGES),
            read_volatile(word(OFF_DIRTY_PAGES)).wrapping_add(n),
        )
    }
}

pub fn heartbeat(cpu: usize) -> u64 {
    // SAFETY: reading probe-owned memory; cpu < MAX_CPUS.
    unsafe { read_volatile(word(OFF_HEARTBEAT + 8 * cpu as u64)) }
}

/// Entry of every secondary vCPU, at CPL3 on its own stack (see boot.rs).
#[no_mangle]
pub extern "C" fn probe_ap_main(index: u32) -> ! {
    // Wait (bounded only by the BSP coming up, which it does within milliseconds) for the BSP
    // to initialise the page, so our registration is not wiped by its zeroing.
    while !ready() {
        core::hint::spin_loop();
    }
    // SAFETY: the online counter is a naturally aligned u64 in probe-owned memory, accessed only
    // atomically by APs (the BSP's plain store happened before the magic became visible).
    let online = unsafe { AtomicU64::from_ptr(word(OFF_ONLINE)) };
    online.fetch_add(1, Ordering::SeqCst);
    let beat = word(OFF_HEARTBEAT + 8 * index as u64);
    let mut n: u64 = 0;
    loop {
        n = n.wrapping_add(1);
        // SAFETY: this AP's own heartbeat slot (index < MAX_CPUS is checked in boot.rs).
        unsafe { write_volatile(beat, n) };
        core::hint::spin_loop();
    }
}
