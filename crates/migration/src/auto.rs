//! `--compress auto`: compress a batch only when that makes it arrive sooner. On a fast link
//! (loopback, 10 GbE) lz4 costs more CPU time than the bytes it saves; on a slow one it
//! roughly doubles the useful bandwidth for typical guest memory. The choice follows measured
//! rates (moving averages), and lz4 is tried again every [`PROBE_EVERY`] batches so a change
//! in the guest's data or the link is noticed.

use crate::Codec;

pub const PROBE_EVERY: u64 = 16;
/// Weight of the newest sample in the moving averages.
const ALPHA: f64 = 0.3;

#[derive(Clone, Debug, Default)]
pub struct AutoCompress {
    batches: u64,
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
    pub fn choose(&mut self) -> Codec {
        self.batches += 1;
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
        self.ratio = blend(self.ratio, (out_bytes as f64 / raw_bytes as f64).min(1.0));
        self.compress_bps = blend(self.compress_bps, raw_bytes as f64 / secs);
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
        // Incompressible data is not worth it even on a slow link.
        assert!(settle(100e6, 1.0).contains(&Codec::None));
    }
}
