//! Token buckets for maximum bandwidth (bytes) and storm limits (packets), in integer
//! nanoseconds so the pipeline stays deterministic for a given `now`.

/// A token bucket refilled at `rate` tokens per second up to `burst` tokens.
///
/// A take larger than the whole burst (a TCP super-frame from an offload port stands for up to
/// 64 KiB of segments, more than a small configured burst) passes only from a full bucket and
/// leaves it in debt by the excess, which refills pay first: such frames are not starved
/// forever, and the long-run rate still holds.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Tokens scaled by 1e9 so sub-token refills between close frames are not lost.
    tokens_nano: u128,
    /// Tokens owed by an oversized take (scaled like `tokens_nano`).
    debt_nano: u128,
    last: u64,
}

impl TokenBucket {
    pub fn new(rate_per_sec: u64, burst: u64) -> Self {
        let burst = burst.max(1);
        TokenBucket {
            rate: rate_per_sec,
            burst,
            tokens_nano: burst as u128 * 1_000_000_000,
            debt_nano: 0,
            last: 0,
        }
    }

    /// Bytes-per-second bucket from a bits/s limit.
    pub fn for_bits(bits_per_sec: u64, burst_bytes: u64) -> Self {
        // A burst smaller than one full-size frame would never pass anything.
        Self::new(bits_per_sec / 8, burst_bytes.max(1514))
    }

    /// Takes `n` tokens if available at time `now` (ns).
    #[inline]
    pub fn take(&mut self, n: u64, now: u64) -> bool {
        let cap = self.burst as u128 * 1_000_000_000;
        if now > self.last {
            let mut add = (now - self.last) as u128 * self.rate as u128;
            let pay = add.min(self.debt_nano);
            self.debt_nano -= pay;
            add -= pay;
            self.tokens_nano = (self.tokens_nano + add).min(cap);
            self.last = now;
        }
        let need = n as u128 * 1_000_000_000;
        if self.tokens_nano >= need {
            self.tokens_nano -= need;
            true
        } else if need > cap && self.tokens_nano == cap && self.debt_nano == 0 {
            self.tokens_nano = 0;
            self.debt_nano = need - cap;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_take_beyond_the_burst_passes_from_a_full_bucket_and_is_paid_back() {
        // 10,000 bytes/s, burst 1514: a 64 KiB super-frame passes once, then nothing until
        // its 62.5 KiB of excess is paid (~6.4 s), so 10 s carry ~100 KB, not more.
        let mut b = TokenBucket::for_bits(80_000, 0);
        assert!(b.take(65_536, 0));
        assert!(!b.take(100, 1_000_000_000), "still in debt after 1 s");
        assert!(!b.take(65_536, 6_000_000_000));
        let mut passed = 65_536u64;
        for ms in 1..=10_000u64 {
            if b.take(1_000, ms * 1_000_000) {
                passed += 1_000;
            }
        }
        assert!(
            (95_000..=112_000).contains(&passed),
            "{passed} bytes in 10 s at 10,000 B/s"
        );
    }

    #[test]
    fn bucket_limits_to_rate_after_burst() {
        // 1000 bytes/s, burst 1514 bytes.
        let mut b = TokenBucket::for_bits(8000, 0);
        assert!(b.take(1000, 0));
        assert!(!b.take(1000, 0), "burst spent");
        assert!(!b.take(1000, 400_000_000), "only ~914 bytes by 0.4 s");
        assert!(b.take(1000, 600_000_000));
        let mut passed = 0;
        for ms in 0..10_000u64 {
            if b.take(100, 600_000_000 + ms * 1_000_000) {
                passed += 100;
            }
        }
        assert!(
            (9_000..=11_600).contains(&passed),
            "{passed} bytes in 10 s at 1000 B/s"
        );
    }
}
