//! When a live migration switches to post-copy (`--postcopy`), as a pure function beside
//! `converge.rs`'s: `always` after the full pass; `auto` where auto-converge would start
//! throttling (rounds stopped shrinking and the estimate does not fit), so the guest is never
//! slowed down; `never` leaves the decision to `converge.rs`.

use super::super::converge::{estimate_ms, Limits, RoundFacts};

/// `--postcopy`, as the VMM sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PostcopyPolicy {
    /// Pre-copy only (auto-converge throttles a guest that outruns the link).
    #[default]
    Never,
    /// Pre-copy, and post-copy instead of throttling when the rounds do not converge.
    Auto,
    /// Post-copy right after the first full pass.
    Always,
}

/// Whether to switch to post-copy now, after a pass that left `f.dirty_bytes` pending.
pub fn switch_to_postcopy(f: &RoundFacts, l: &Limits, p: PostcopyPolicy) -> bool {
    match p {
        PostcopyPolicy::Never => false,
        PostcopyPolicy::Always => true,
        PostcopyPolicy::Auto => {
            if estimate_ms(f.dirty_bytes, f.link_rate) <= l.max_downtime_ms {
                return false; // pre-copy converged: a short pause is cheaper and safer
            }
            let stalled = !f.shrinking();
            // The guest dirties faster than the link moves pages: no round can shrink the
            // set, and auto-converge would throttle it at once (converge.rs).
            let outruns = f.link_rate > 0.0 && f.dirty_rate >= f.link_rate;
            stalled || outruns || f.rounds >= l.max_rounds
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_downtime_ms: 50,
        max_rounds: 30,
        throttle: true,
    };

    fn facts(dirty_mib: u64, prev_mib: Option<u64>, rounds: u32) -> RoundFacts {
        RoundFacts {
            dirty_bytes: dirty_mib << 20,
            previous_dirty_bytes: prev_mib.map(|p| p << 20),
            link_rate: (1u64 << 30) as f64,
            rounds,
            throttle: 0,
            dirty_rate: 0.0,
            stalled: 0,
        }
    }

    #[test]
    fn auto_switches_only_where_throttling_would_start() {
        use PostcopyPolicy::*;
        // After the full pass nothing is known about shrinking: another round.
        assert!(!switch_to_postcopy(&facts(64, None, 0), &L, Auto));
        // Shrinking by more than a quarter: pre-copy goes on.
        assert!(!switch_to_postcopy(&facts(64, Some(128), 1), &L, Auto));
        // Not shrinking and not fitting 50 ms at 1 GiB/s: post-copy.
        assert!(switch_to_postcopy(&facts(64, Some(64), 1), &L, Auto));
        // Fits the downtime: an ordinary switch-over.
        assert!(!switch_to_postcopy(&facts(10, Some(10), 1), &L, Auto));
        // Out of rounds and still too big.
        assert!(switch_to_postcopy(&facts(64, Some(128), 30), &L, Auto));
        // Dirtying faster than the link, right after the full pass: post-copy at once.
        let outrun = RoundFacts {
            dirty_rate: 2.0 * (1u64 << 30) as f64,
            ..facts(64, None, 0)
        };
        assert!(switch_to_postcopy(&outrun, &L, Auto));
        assert!(switch_to_postcopy(&facts(1, None, 0), &L, Always));
        assert!(!switch_to_postcopy(&facts(64, Some(64), 30), &L, Never));
    }
}
