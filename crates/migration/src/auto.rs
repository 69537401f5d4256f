//! `--compress auto`: compress a batch only when that makes it arrive sooner. On a fast link
//! (loopback, 10 GbE) lz4 costs more CPU time than the bytes it saves; on a slow one it
//! roughly doubles the useful bandwidth for typical guest memory.
//!
//! The decision starts from a **sample**: a [`PROBE_SLICE`] of page data from each batch at
//! the start of the full pass, [`SAMPLE_BYTES`] in all, goes through lz4 on the side while the
//! batches themselves go raw. (Compressing whole batches as the sample, 4 MiB per stream, cost
//! a migration of incompressible memory ~15 % more sender CPU per MiB on its full pass, with a
//! fresh 8 MiB output buffer to fault in: `vireo-bench migrate --link`, `auto` against `none`,
//! session 30.) If lz4 saved less than 10 % of them, the guest's memory
//! is incompressible (random or encrypted data, memory that holds compressed files) and
//! compression is off for the rest of the migration — never tried again, so it costs nothing
//! on the dirty rounds and in the pause. Otherwise lz4 is used when, at the measured rates
//! (moving averages of lz4's speed and ratio and of the link), compressing and sending the
//! smaller batch beats sending it raw, and tried again every [`PROBE_EVERY`] batches so a
//! change in the guest's data or the link is noticed.

use crate::Codec;

pub const PROBE_EVERY: u64 = 16;
/// Page data compressed to decide whether the guest's memory compresses at all.
pub const SAMPLE_BYTES: u64 = 512 << 10;
/// At most this much of one batch's page data goes into the sample (more batches, a wider
/// look at the guest's memory for the same CPU).
pub const PROBE_SLICE: usize = 64 << 10;
/// lz4 output per input byte at or above which the sample counts as incompressible.
const INCOMPRESSIBLE: f64 = 0.9;
/// Weight of the newest sample in the moving averages.
const ALPHA: f64 = 0.3;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verdict {
    /// Still taking the sample (the batches go raw meanwhile).
    #[default]
    Sampling,
    /// The sample did not compress: no compression from now on.
    Incompressible,
    /// The sample compressed: lz4 whenever it wins at the current rates.
    Compressible,
}

#[derive(Clone, Debug, Default)]
pub struct AutoCompress {
    batches: u64,
    sampled_in: u64,
    sampled_out: u64,
    verdict: Verdict,
    /// Compressed bytes per raw byte, for lz4.
    ratio: Option<f64>,
    /// Raw bytes lz4 compresses per second.
    compress_bps: Option<f64>,
    /// Bytes per second the link took.
    link_bps: Option<f64>,
}

fn blend(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |o| o * (1.0 - ALPHA) + new * ALPHA))
}

impl AutoCompress {
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Whether the caller should compress a [`PROBE_SLICE`] of the next batch's page data on
    /// the side and report it with [`AutoCompress::observe_compress`].
    pub fn sampling(&self) -> bool {
        self.verdict == Verdict::Sampling
    }

    pub fn choose(&mut self) -> Codec {
        self.batches += 1;
        match self.verdict {
            Verdict::Sampling => return Codec::None,
            Verdict::Incompressible => return Codec::None,
            Verdict::Compressible => {}
        }
        let (Some(ratio), Some(cbps), Some(lbps)) = (self.ratio, self.compress_bps, self.link_bps)
        else {
            return Codec::Lz4;
        };
        if self.batches.is_multiple_of(PROBE_EVERY) {
            return Codec::Lz4;
        }
        // Seconds per raw byte: sending it raw, or compressing it and sending the result.
        let raw = 1.0 / lbps;
        let compressed = 1.0 / cbps + ratio / lbps;
        if compressed < raw * 0.95 {
            Codec::Lz4
        } else {
            Codec::None
        }
    }

    pub fn observe_compress(&mut self, raw_bytes: usize, out_bytes: usize, secs: f64) {
        if raw_bytes == 0 || secs <= 0.0 {
            return;
        }
        let out_bytes = out_bytes.min(raw_bytes);
        self.ratio = blend(self.ratio, out_bytes as f64 / raw_bytes as f64);
        self.compress_bps = blend(self.compress_bps, raw_bytes as f64 / secs);
        if self.verdict == Verdict::Sampling {
            self.sampled_in += raw_bytes as u64;
            self.sampled_out += out_bytes as u64;
            if self.sampled_in >= SAMPLE_BYTES {
                let ratio = self.sampled_out as f64 / self.sampled_in as f64;
                self.verdict = if ratio >= INCOMPRESSIBLE {
                    Verdict::Incompressible
                } else {
                    Verdict::Compressible
                };
            }
        }
    }

    pub fn observe_link(&mut self, bytes: usize, secs: f64) {
        if bytes == 0 || secs <= 0.0 {
            return;
        }
        self.link_bps = blend(self.link_bps, bytes as f64 / secs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settle(link_bps: f64, ratio: f64) -> Vec<Codec> {
        let mut a = AutoCompress::default();
        for _ in 0..8 {
            a.observe_compress(
                1 << 20,
                ((1 << 20) as f64 * ratio) as usize,
                (1 << 20) as f64 / 2e9,
            );
            a.observe_link(1 << 20, (1 << 20) as f64 / link_bps);
        }
        (0..PROBE_EVERY * 2).map(|_| a.choose()).collect()
    }

    #[test]
    fn slow_links_compress_fast_links_do_not_and_lz4_is_probed_again() {
        assert!(settle(100e6, 0.4).iter().all(|&c| c == Codec::Lz4));
        let fast = settle(20e9, 0.4);
        assert!(fast.contains(&Codec::None));
        assert_eq!(
            fast.iter().filter(|&&c| c == Codec::Lz4).count(),
            2,
            "{fast:?}"
        );
        // Incompressible data is not worth it even on a slow link, and once the sample
        // said so, lz4 is never tried again.
        assert!(settle(100e6, 1.0).iter().all(|&c| c == Codec::None));
        assert!(settle(100e6, 0.95).iter().all(|&c| c == Codec::None));
    }

    #[test]
    fn the_sample_decides_once_it_is_large_enough() {
        let mut a = AutoCompress::default();
        // 128 KiB of incompressible data is not yet a verdict: the batches go raw while
        // the sample is taken beside them.
        a.observe_compress(128 << 10, 128 << 10, 1e-4);
        assert_eq!(a.verdict(), Verdict::Sampling);
        assert!(a.sampling());
        assert_eq!(a.choose(), Codec::None);
        a.observe_compress(384 << 10, 384 << 10, 3e-4);
        assert_eq!(a.verdict(), Verdict::Incompressible);
        assert!(!a.sampling());
        assert!((0..100).all(|_| a.choose() == Codec::None));
        let mut b = AutoCompress::default();
        b.observe_compress(512 << 10, 128 << 10, 2e-4);
        assert_eq!(b.verdict(), Verdict::Compressible);
        assert!(!b.sampling());
    }
}
