//! Which pages a post-copy destination still lacks, shared by the thread that places arriving
//! pages and the thread that serves faults. A pure structure (no I/O), so the placement rules
//! are tested alone:
//!
//! - a page is placed **once**: [`Tracker::claim`] says whether an arriving copy is the first
//!   (place it) or a duplicate (a page asked for on a fault and then reached by the background
//!   stream, or the other way round: skip it);
//! - a fault on a page that was never missing is not the source's business (it is a zero page
//!   the pre-copy punched as a hole) and is filled locally; a page that was missing is never
//!   filled locally, even once claimed: its copy may be on its way into RAM at that moment.
//!
//! One bit per page of guest-physical space up to the end of RAM, atomics only: both threads
//! work without a lock.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::memory::PAGE_SIZE;

pub struct Tracker {
    /// Bit set: the page is missing (listed by the source and not placed yet).
    words: Vec<AtomicU64>,
    /// Bit set: the source listed the page (fixed once built).
    listed: Vec<u64>,
    remaining: AtomicU64,
    end: u64,
}

/// What to do with a page that arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// The first copy of a missing page: put it in guest RAM.
    Copy,
    /// Placed before, or never missing: drop it.
    Skip,
}

impl Tracker {
    /// Marks the pages of `runs` (gpa, pages) missing; `end` bounds guest-physical space.
    pub fn new(end: u64, runs: &[(u64, u64)]) -> Tracker {
        let pages = end.div_ceil(PAGE_SIZE);
        let words: Vec<AtomicU64> = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let mut t = Tracker {
            words,
            listed: Vec::new(),
            remaining: AtomicU64::new(0),
            end,
        };
        for &(gpa, n) in runs {
            for i in 0..n {
                let g = gpa + i * PAGE_SIZE;
                if g < end {
                    let (w, b) = Self::bit(g);
                    if t.words[w].fetch_or(b, Ordering::Relaxed) & b == 0 {
                        t.remaining.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        t.listed = t.words.iter().map(|w| w.load(Ordering::Relaxed)).collect();
        t
    }

    fn bit(gpa: u64) -> (usize, u64) {
        let p = gpa / PAGE_SIZE;
        ((p / 64) as usize, 1 << (p % 64))
    }

    /// The page at `gpa` is still missing.
    pub fn is_missing(&self, gpa: u64) -> bool {
        if gpa >= self.end {
            return false;
        }
        let (w, b) = Self::bit(gpa);
        self.words[w].load(Ordering::Acquire) & b != 0
    }

    /// The source listed the page at `gpa` (missing now, or placed since).
    pub fn was_listed(&self, gpa: u64) -> bool {
        if gpa >= self.end {
            return false;
        }
        let (w, b) = Self::bit(gpa);
        self.listed[w] & b != 0
    }

    /// A copy of `gpa` arrived: [`Place::Copy`] exactly once per missing page.
    pub fn claim(&self, gpa: u64) -> Place {
        if gpa >= self.end {
            return Place::Skip;
        }
        let (w, b) = Self::bit(gpa);
        if self.words[w].fetch_and(!b, Ordering::AcqRel) & b != 0 {
            self.remaining.fetch_sub(1, Ordering::AcqRel);
            Place::Copy
        } else {
            Place::Skip
        }
    }

    /// Pages still missing.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// The missing pages of the `window`-page aligned block around `gpa`, faulting page
    /// first (it is what a vCPU waits for), at most `window` of them.
    pub fn window(&self, gpa: u64, window: u64) -> Vec<u64> {
        let gpa = gpa / PAGE_SIZE * PAGE_SIZE;
        let span = window.max(1) * PAGE_SIZE;
        let start = gpa / span * span;
        let mut out = Vec::new();
        if self.is_missing(gpa) {
            out.push(gpa);
        }
        let mut g = start;
        while g < start + span && g < self.end {
            if g != gpa && self.is_missing(g) {
                out.push(g);
            }
            g += PAGE_SIZE;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    #[test]
    fn each_missing_page_is_placed_once_whoever_brings_it() {
        let t = Tracker::new(1 << 20, &[(4 * P, 3), (100 * P, 1), (4 * P, 1)]);
        assert_eq!(t.remaining(), 4, "an overlapping run counts its pages once");
        assert!(t.is_missing(5 * P) && !t.is_missing(7 * P));
        // A fault asks for page 5: it comes in answer to the request...
        assert_eq!(t.claim(5 * P), Place::Copy);
        // ...and again from the background stream: skipped, as is a page never missing.
        assert_eq!(t.claim(5 * P), Place::Skip);
        assert_eq!(t.claim(7 * P), Place::Skip);
        assert_eq!(t.claim(1 << 30), Place::Skip, "outside RAM");
        assert_eq!(t.remaining(), 3);
        for g in [4 * P, 6 * P, 100 * P] {
            assert_eq!(t.claim(g), Place::Copy);
        }
        assert_eq!(t.remaining(), 0);
        assert!(!t.is_missing(4 * P));
        assert!(
            t.was_listed(4 * P) && t.was_listed(100 * P),
            "placed pages stay listed"
        );
        assert!(!t.was_listed(7 * P) && !t.was_listed(1 << 30));
    }

    #[test]
    fn a_window_lists_what_is_still_missing_faulting_page_first() {
        let t = Tracker::new(1 << 20, &[(16 * P, 16)]);
        assert_eq!(t.claim(18 * P), Place::Copy);
        let w = t.window(21 * P + 123, 8);
        assert_eq!(w[0], 21 * P);
        assert_eq!(w.len(), 7, "16..24 without 18: {w:?}");
        assert!(!w.contains(&(18 * P)));
        assert!(t.window(2 * P, 8).is_empty(), "nothing missing there");
    }

    #[test]
    fn two_threads_claiming_the_same_pages_place_each_once() {
        let t = std::sync::Arc::new(Tracker::new(64 << 20, &[(0, 16384)]));
        let placed: Vec<u64> = (0..2)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    (0..16384u64)
                        .filter(|i| t.claim(i * P) == Place::Copy)
                        .count() as u64
                })
            })
            .map(|h| h.join().unwrap())
            .collect();
        assert_eq!(placed.iter().sum::<u64>(), 16384);
        assert_eq!(t.remaining(), 0);
    }
}
