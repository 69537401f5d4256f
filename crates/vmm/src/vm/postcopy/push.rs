//! The source's background push of post-copy's remaining pages, shared by every stream of the
//! migration (docs/migration.md, "Post-copy"). A pure structure (no I/O), so the sharing rules
//! are tested alone:
//!
//! - [`Background::take`] deals out the missing pages in address order, a batch at a time,
//!   from one atomic cursor: each page is offered to one stream only, and a stream that
//!   finishes a batch takes the next, so the streams end within a batch of one another however
//!   unevenly they go (stream 0 stops for requests; a fixed split of the address space would
//!   leave its part last). Every page is claimed in the [`Tracker`] the requests claim in too,
//!   so a page already sent on request is skipped, and one taken here is never sent on request.
//! - [`Budget`] is `--bandwidth` for the background of all streams together; answers to
//!   requests are never counted or held back.
//!
//! Locking: none, atomics only; each stream has one owner thread.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::tracker::{Place, Tracker};

/// The missing pages in address order and how far the streams have taken them.
pub struct Background {
    order: Vec<u64>,
    next: AtomicUsize,
}

impl Background {
    /// `order`: every missing page, in address order.
    pub fn new(order: Vec<u64>) -> Background {
        Background {
            order,
            next: AtomicUsize::new(0),
        }
    }

    /// The next pages, at most `n`, that no stream has taken and no request has claimed, each
    /// claimed in `unsent` for the caller (it must send them). Empty once nothing is left.
    pub fn take(&self, n: usize, unsent: &Tracker) -> Vec<u64> {
        let n = n.max(1);
        let mut out = Vec::with_capacity(n);
        // Bounded: every turn moves the shared cursor on by `n`.
        while out.is_empty() {
            let start = self.next.fetch_add(n, Ordering::Relaxed);
            if start >= self.order.len() {
                break;
            }
            let stop = (start + n).min(self.order.len());
            out.extend(
                self.order[start..stop]
                    .iter()
                    .copied()
                    .filter(|&g| unsent.claim(g) == Place::Copy),
            );
        }
        out
    }
}

/// `--bandwidth` shared by the streams' background pushes: bytes/s over the time since the
/// post-copy phase began.
pub struct Budget {
    rate: Option<u64>,
    sent: AtomicU64,
}

impl Budget {
    pub fn new(rate: Option<u64>) -> Budget {
        Budget {
            rate,
            sent: AtomicU64::new(0),
        }
    }

    /// Background bytes put on the wire.
    pub fn spend(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// How long a stream must wait, `elapsed` into the phase, before its next background
    /// batch is due; `None`: send now. Several streams may each send one batch at the edge,
    /// so the cap is overshot by at most a batch per stream.
    pub fn ahead(&self, elapsed: Duration) -> Option<Duration> {
        let rate = self.rate?;
        let due =
            Duration::from_secs_f64(self.sent.load(Ordering::Relaxed) as f64 / rate.max(1) as f64);
        due.checked_sub(elapsed).filter(|d| !d.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PAGE_SIZE as P;

    #[test]
    fn each_page_is_taken_by_one_stream_skipping_the_requested_ones() {
        let pages = 10_000u64;
        let unsent = Tracker::new(pages * P, &[(0, pages)]);
        // Pages a request claimed (and sent on stream 0) before the push reached them.
        let requested: Vec<u64> = (0..pages).step_by(7).map(|i| i * P).collect();
        for &g in &requested {
            assert_eq!(unsent.claim(g), Place::Copy);
        }
        let bg = Background::new((0..pages).map(|i| i * P).collect());
        let taken: Vec<Vec<u64>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..3)
                .map(|t| {
                    let (bg, unsent) = (&bg, &unsent);
                    s.spawn(move || {
                        let mut mine = Vec::new();
                        loop {
                            let b = bg.take(if t == 0 { 64 } else { 256 }, unsent);
                            if b.is_empty() {
                                return mine;
                            }
                            assert!(b.windows(2).all(|w| w[0] < w[1]), "a batch is in order");
                            mine.extend(b);
                        }
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let mut all: Vec<u64> = taken.iter().flatten().copied().collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a page taken twice");
        assert_eq!(
            n as u64 + requested.len() as u64,
            pages,
            "a page left behind"
        );
        assert!(requested.iter().all(|g| all.binary_search(g).is_err()));
        assert_eq!(unsent.remaining(), 0);
        assert!(bg.take(64, &unsent).is_empty(), "nothing after the end");
    }

    #[test]
    fn a_batch_of_requested_pages_only_is_passed_over() {
        let unsent = Tracker::new(1 << 20, &[(0, 8)]);
        for i in 0..4 {
            unsent.claim(i * P);
        }
        let bg = Background::new((0..8).map(|i| i * P).collect());
        assert_eq!(bg.take(4, &unsent), vec![4 * P, 5 * P, 6 * P, 7 * P]);
        assert!(bg.take(4, &unsent).is_empty());
    }

    #[test]
    fn the_budget_counts_every_streams_background_together() {
        let b = Budget::new(Some(1 << 20));
        assert_eq!(b.ahead(Duration::ZERO), None, "nothing sent, nothing owed");
        b.spend(1 << 19); // stream 1
        b.spend(1 << 19); // stream 2: together one second's worth
        assert_eq!(
            b.ahead(Duration::from_millis(250)),
            Some(Duration::from_millis(750))
        );
        assert_eq!(b.ahead(Duration::from_secs(1)), None);
        let free = Budget::new(None);
        free.spend(u64::MAX / 2);
        assert_eq!(free.ahead(Duration::ZERO), None, "no cap");
    }
}
