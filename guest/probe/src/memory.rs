//! MEM FILL / VERIFY / SUM over guest-physical RAM above the probe's own 8 MiB.

use crate::bootinfo::BootInfo;
use crate::pattern;

pub const PROBE_OWNED_END: u64 = 8 << 20;
const MIB: u64 = 1 << 20;

pub enum Error {
    NoMemmap,
    Range,
}

/// Checks a MiB range and returns its byte bounds.
pub fn range(info: &BootInfo, start_mib: u64, len_mib: u64) -> Result<(u64, u64), Error> {
    if !info.has_memmap {
        return Err(Error::NoMemmap);
    }
    let start = start_mib.checked_mul(MIB).ok_or(Error::Range)?;
    let end = start_mib
        .checked_add(len_mib)
        .and_then(|e| e.checked_mul(MIB))
        .ok_or(Error::Range)?;
    if start < PROBE_OWNED_END || !info.is_usable_ram(start, end) {
        return Err(Error::Range);
    }
    Ok((start, end))
}

fn words_mut(start: u64, end: u64) -> &'static mut [u64] {
    // SAFETY: `range` checked this is RAM outside everything the probe itself uses, so no Rust
    // object aliases it; it is identity-mapped.
    unsafe { core::slice::from_raw_parts_mut(start as *mut u64, ((end - start) / 8) as usize) }
}

pub fn fill(start: u64, end: u64, seed: u64) {
    // In 1 MiB pieces so the pattern offsets stay simple and the slices small.
    let mut at = start;
    while at < end {
        let next = (at + MIB).min(end);
        pattern::fill(words_mut(at, next), seed, at);
        at = next;
    }
}

pub fn verify(start: u64, end: u64, seed: u64) -> Option<u64> {
    let mut at = start;
    while at < end {
        let next = (at + MIB).min(end);
        if let Some(off) = pattern::verify(words_mut(at, next), seed, at) {
            return Some(off);
        }
        at = next;
    }
    None
}

/// FNV-1a 64 over the bytes of the range.
pub fn fnv1a(start: u64, end: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &w in words_mut(start, end).iter() {
        for b in w.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}
