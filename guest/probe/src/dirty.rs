//! The DIRTY workload: rewrite one u64 per 4 KiB page over a range, pass after pass, at a given
//! rate, in small steps between which the command loop polls COM1.

use crate::arch::rdtsc;
use crate::{pattern, status};

const PAGE: u64 = 4096;
/// Pages written between two COM1 polls when running flat out (a COM1 poll is a VM exit).
const PAGES_PER_STEP: u64 = 512;

pub struct Dirty {
    start: u64,
    pages: u64,
    next_page: u64,
    pub passes: u64,
    pub written: u64,
    /// TSC ticks per page at the requested rate; 0 = unthrottled.
    ticks_per_page: u64,
    t0: u64,
}

impl Dirty {
    pub fn new(start: u64, end: u64, rate_mib_s: u64, tsc_khz: u64) -> Self {
        let pages_per_s = rate_mib_s.saturating_mul(256);
        let ticks_per_page = (tsc_khz * 1000)
            .checked_div(pages_per_s)
            .map_or(0, |t| t.max(1));
        Dirty {
            start,
            pages: (end - start) / PAGE,
            next_page: 0,
            passes: 0,
            written: 0,
            ticks_per_page,
            t0: rdtsc(),
        }
    }

    /// Writes up to one step of pages, respecting the rate.
    pub fn step(&mut self) {
        if self.pages == 0 {
            return;
        }
        let allowed = match rdtsc()
            .wrapping_sub(self.t0)
            .checked_div(self.ticks_per_page)
        {
            None => PAGES_PER_STEP, // unthrottled
            Some(due) => due.saturating_sub(self.written).min(PAGES_PER_STEP),
        };
        for _ in 0..allowed {
            let addr = self.start + self.next_page * PAGE;
            // SAFETY: the range was checked by memory::range (RAM, outside the probe's own 8 MiB).
            unsafe {
                core::ptr::write_volatile(addr as *mut u64, pattern::splitmix64(self.passes ^ addr))
            };
            self.written += 1;
            // Counted per page, not per step: with a dirty log on, every first write to a page
            // is a write fault (~25 µs under KVM-PVM), so a 512-page step takes 10-15 ms and a
            // per-step count would hide up to a whole step inside a migration's measured gap.
            status::add_dirty_pages(1);
            self.next_page += 1;
            if self.next_page == self.pages {
                self.next_page = 0;
                self.passes += 1;
                status::bump_dirty_passes();
            }
        }
    }
}
