//! Token buckets for maximum bandwidth (bytes) and storm limits (packets), in integer
//! nanoseconds so the pipeline stays deterministic for a given `now`.

/// A token bucket refilled at `rate` tokens per second up to `burst` tokens.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Tokens scaled by 1e9 so sub-token refills between close frames are not lost.
    tokens_nano: u128,
    last: u64,
}

impl TokenBucket {
    pub fn new(rate_per_sec: u64, burst: u64) -> Self {
        let burst = burst.max(1);
        TokenBucket {
            rate: rate_per_sec,
            burst,
            tokens_nano: burst as u128 * 1_000_000_000,
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
        if now > self.last {
            let add = (now - self.last) as u128 * self.rate as u128;
            let cap = self.burst as u128 * 1_000_000_000;
            self.tokens_nano = (self.tokens_nano + add).min(cap);
            self.last = now;
        }
        let need = n as u128 * 1_000_000_000;
        if self.tokens_nano >= need {
            self.tokens_nano -= need;
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
