//! When a live migration switches over, as a pure function of what the last round measured
//! (docs/migration.md, "Convergence"). No I/O and no clock here, so the policy is tested alone.
//!
//! - The pause would last about `dirty bytes / link rate`: once that fits `max_downtime`,
//!   switch over — unless one more round is cheap and pays: the guest dirties at most three
//!   quarters as fast as the link drains, so a round of about the estimated pause, the guest
//!   running, leaves at most three quarters of the pages for the pause — the shrink the
//!   rounds themselves are held to ([`one_more_pays`]); a round that did not
//!   shrink a pause still over [`RETRY_FROM_US`] is tried again, [`PATIENCE`] times in a row.
//! - Rounds that stop shrinking mean the guest dirties about as fast as the link drains:
//!   more rounds only add work. Then the guest is throttled (auto-converge): its vCPUs are
//!   parked for a share of every 10 ms slice, starting at [`THROTTLE_START`] % and growing by
//!   [`THROTTLE_STEP`] each round that still does not fit, up to [`THROTTLE_MAX`] %.
//! - A guest that dirties memory clearly faster than the link drains it (its dirty rate,
//!   corrected for the throttle in force, at least the link rate) is throttled at once,
//!   without waiting for a round that fails to shrink, and hard enough to bring its dirty
//!   rate under half the link's: each round it runs unthrottled there only re-sends the same
//!   hot pages.
//! - After `max_rounds` rounds, switch over whatever the estimate: the downtime is then
//!   longer than asked (reported), but a migration never runs forever.

/// First throttle share, percent of each slice the vCPUs are parked.
pub const THROTTLE_START: u32 = 20;
pub const THROTTLE_STEP: u32 = 20;
pub const THROTTLE_MAX: u32 = 99;
/// An estimated pause at or under this (µs) is not worth another round to shorten: the
/// round's own fetch and drain (a round trip to the destination) cost about as much. Was
/// 1 ms; since the pause's pages go in one gathered record (session 35) the pause costs
/// ~5 µs a page, and a round of a few hundred µs leaves only what the guest dirties in it.
pub const WORTH_A_ROUND_US: u64 = 250;
/// Rounds in a row that may fail to shrink the set while the pause that fits is still longer
/// than [`RETRY_FROM_US`]: a short round's fixed costs (the log's fetch, the streams' start,
/// the drain's round trip) swing by a millisecond on a loaded host, so one round that did not
/// shrink says little. Seen in `vireo-bench migrate` (session 36): 2.3 → 1.9 MiB, paused with
/// 486 pages (an 8.7 ms gap) where the next round would likely have halved it.
pub const PATIENCE: u32 = 2;
/// An estimated pause from which a round that did not shrink the set is tried again
/// (up to [`PATIENCE`] in a row); under it, a stalled set is paused as it is.
pub const RETRY_FROM_US: u64 = 1000;

/// What a round measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoundFacts {
    /// Dirty pages pending now, in bytes.
    pub dirty_bytes: u64,
    /// Pending before the last round (`None` after the full pass).
    pub previous_dirty_bytes: Option<u64>,
    /// Bytes per second the link took (0: unknown yet).
    pub link_rate: f64,
    /// Dirty passes done.
    pub rounds: u32,
    /// Throttle share in force now (percent).
    pub throttle: u32,
    /// Bytes per second the guest dirtied over the last pass, under `throttle` (0: unknown).
    pub dirty_rate: f64,
    /// Rounds in a row, this one included, that did not shrink the set by a quarter.
    pub stalled: u32,
}

impl RoundFacts {
    /// Whether the last round shrank the set by at least a quarter (the full pass always does).
    pub fn shrinking(&self) -> bool {
        shrinks(self.previous_dirty_bytes, self.dirty_bytes)
    }
}

/// Whether `now` dirty bytes are under three quarters of `previous` (`None`: the full pass).
pub fn shrinks(previous: Option<u64>, now: u64) -> bool {
    previous.is_none_or(|prev| now * 4 < prev * 3)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Pause and send the rest.
    SwitchOver,
    /// Another round with the guest running, throttled at this share (0: not throttled).
    Round { throttle: u32 },
}

/// The policy's knobs.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_downtime_ms: u64,
    pub max_rounds: u32,
    /// Auto-converge allowed (off: only the estimate and `max_rounds` decide).
    pub throttle: bool,
}

/// Estimated pause for `bytes` at `rate` bytes/s, in ms (unknown rate: as long as possible).
pub fn estimate_ms(bytes: u64, rate: f64) -> u64 {
    estimate_in(bytes, rate, 1e3)
}

/// [`estimate_ms`] in µs, for the short pauses a last round is weighed against.
pub fn estimate_us(bytes: u64, rate: f64) -> u64 {
    estimate_in(bytes, rate, 1e6)
}

/// `bytes / rate` in units of which a second has `per_second`, rounded up.
fn estimate_in(bytes: u64, rate: f64, per_second: f64) -> u64 {
    if bytes == 0 {
        return 0;
    }
    if rate <= 0.0 {
        return u64::MAX;
    }
    (bytes as f64 / rate * per_second).ceil() as u64
}

/// Whether a pause that already fits would be shortened enough by one more round with the
/// guest running: the round sends what the pause would (about the estimate's time), and the
/// guest, dirtying at most three quarters of the link's rate (measured: unknown never pays),
/// leaves at most three quarters of it behind (it was half until session 36: a guest at
/// 53 % of the link was paused with 5.6 MiB, a 12.6 ms gap, where a round would have taken
/// a quarter or more off). Only while rounds still shrink the set, so a guest that rewrites
/// one small hot set at once is not chased — but a pause over [`RETRY_FROM_US`] gets up to
/// [`PATIENCE`] rounds in a row that did not shrink it (a small hot set costs those few).
pub fn one_more_pays(f: &RoundFacts) -> bool {
    let shrinking = f.shrinking();
    let estimate = estimate_us(f.dirty_bytes, f.link_rate);
    let retry = f.stalled <= PATIENCE && estimate > RETRY_FROM_US;
    estimate > WORTH_A_ROUND_US
        && f.dirty_rate > 0.0
        && f.dirty_rate * 4.0 <= f.link_rate * 3.0
        && (shrinking || retry)
}

pub fn decide(f: &RoundFacts, l: &Limits) -> Decision {
    if f.rounds >= l.max_rounds {
        return Decision::SwitchOver;
    }
    if estimate_ms(f.dirty_bytes, f.link_rate) <= l.max_downtime_ms {
        return if one_more_pays(f) {
            Decision::Round {
                throttle: f.throttle,
            }
        } else {
            Decision::SwitchOver
        };
    }
    if !l.throttle {
        return Decision::Round {
            throttle: f.throttle,
        };
    }
    // Shrinking by at least a quarter: the guest is slower than the link; keep going as is.
    let shrinking = f.shrinking();
    // What the guest would dirty unthrottled: the measured rate ran under `throttle`.
    let running = (1.0 - f64::from(f.throttle.min(THROTTLE_MAX)) / 100.0).max(0.01);
    let unthrottled = f.dirty_rate / running;
    let outruns = f.link_rate > 0.0 && unthrottled >= f.link_rate;
    if shrinking && !outruns {
        return Decision::Round {
            throttle: f.throttle,
        };
    }
    let mut throttle = if shrinking {
        f.throttle
    } else if f.throttle == 0 {
        THROTTLE_START
    } else {
        (f.throttle + THROTTLE_STEP).min(THROTTLE_MAX)
    };
    if outruns {
        // The share that leaves the guest half the link's rate: (1 - p) * unthrottled = link / 2.
        let needed = ((1.0 - f.link_rate / (2.0 * unthrottled)) * 100.0).ceil() as u32;
        throttle = throttle.max(needed.clamp(THROTTLE_START, THROTTLE_MAX));
    }
    Decision::Round { throttle }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_downtime_ms: 50,
        max_rounds: 30,
        throttle: true,
    };
    const GIB: f64 = (1u64 << 30) as f64;

    fn facts(dirty_mib: u64, prev_mib: Option<u64>, rounds: u32, throttle: u32) -> RoundFacts {
        RoundFacts {
            dirty_bytes: dirty_mib << 20,
            previous_dirty_bytes: prev_mib.map(|p| p << 20),
            link_rate: GIB,
            rounds,
            throttle,
            dirty_rate: 0.0,
            stalled: 0,
        }
    }

    #[test]
    fn switches_over_once_the_estimate_fits() {
        // 40 MiB at 1 GiB/s: ~40 ms.
        assert_eq!(
            decide(&facts(40, Some(100), 2, 0), &L),
            Decision::SwitchOver
        );
        assert_eq!(
            decide(&facts(60, Some(100), 2, 0), &L),
            Decision::Round { throttle: 0 }
        );
        assert_eq!(estimate_ms(0, 0.0), 0);
        assert_eq!(estimate_ms(1, 0.0), u64::MAX, "no rate measured yet");
    }

    #[test]
    fn a_guest_that_outruns_the_link_is_throttled_at_once_and_hard_enough() {
        // Dirtying 4 GiB/s against a 1 GiB/s link, after the full pass: no round can shrink
        // the set, so the throttle starts now, at the share leaving the guest 0.5 GiB/s.
        let f = RoundFacts {
            dirty_rate: 4.0 * GIB,
            ..facts(64, None, 0, 0)
        };
        assert_eq!(decide(&f, &L), Decision::Round { throttle: 88 });
        // Measured under 50 %: the guest would do 2 GiB/s unthrottled; 75 % is needed.
        let f = RoundFacts {
            dirty_rate: GIB,
            ..facts(64, Some(128), 1, 50)
        };
        assert_eq!(decide(&f, &L), Decision::Round { throttle: 75 });
        // Slower than the link and shrinking: left alone.
        let f = RoundFacts {
            dirty_rate: 0.5 * GIB,
            ..facts(64, Some(128), 1, 0)
        };
        assert_eq!(decide(&f, &L), Decision::Round { throttle: 0 });
        // Auto-converge off: never throttled.
        let no = Limits {
            throttle: false,
            ..L
        };
        let f = RoundFacts {
            dirty_rate: 4.0 * GIB,
            ..facts(64, None, 0, 0)
        };
        assert_eq!(decide(&f, &no), Decision::Round { throttle: 0 });
    }

    #[test]
    fn throttles_harder_while_rounds_do_not_shrink_and_gives_up_at_max_rounds() {
        assert_eq!(
            decide(&facts(64, Some(64), 1, 0), &L),
            Decision::Round {
                throttle: THROTTLE_START
            }
        );
        assert_eq!(
            decide(&facts(64, Some(64), 2, THROTTLE_START), &L),
            Decision::Round {
                throttle: THROTTLE_START + THROTTLE_STEP
            }
        );
        assert_eq!(
            decide(&facts(64, Some(64), 9, 90), &L),
            Decision::Round {
                throttle: THROTTLE_MAX
            }
        );
        // Shrinking under a throttle: keep the share.
        assert_eq!(
            decide(&facts(64, Some(128), 3, 40), &L),
            Decision::Round { throttle: 40 }
        );
        assert_eq!(
            decide(&facts(64, Some(64), 30, 99), &L),
            Decision::SwitchOver
        );
        let no = Limits {
            throttle: false,
            ..L
        };
        assert_eq!(
            decide(&facts(64, Some(64), 1, 0), &no),
            Decision::Round { throttle: 0 }
        );
    }

    #[test]
    fn a_pause_that_fits_gets_one_more_round_while_that_shrinks_it() {
        // 8 MiB at 1 GiB/s (~8 ms) fits 50 ms; the guest dirties 128 MiB/s, an eighth of the
        // link: a round of ~8 ms leaves ~1 MiB, so it pays.
        let slow = RoundFacts {
            dirty_rate: GIB / 8.0,
            ..facts(8, None, 0, 0)
        };
        assert_eq!(decide(&slow, &L), Decision::Round { throttle: 0 });
        // Then ~1 MiB (~1 ms): still worth one, as it shrank by more than a quarter.
        let small = RoundFacts {
            dirty_rate: GIB / 8.0,
            ..facts(1, Some(8), 1, 0)
        };
        assert_eq!(decide(&small, &L), Decision::Round { throttle: 0 });
        // ~200 KiB (~0.2 ms): not worth a round.
        let tiny = RoundFacts {
            dirty_bytes: 200 << 10,
            ..small
        };
        assert_eq!(decide(&tiny, &L), Decision::SwitchOver);
        // At 60 % of the link's rate a round still takes 40 % off: one more.
        let brisk = RoundFacts {
            dirty_rate: 0.6 * GIB,
            ..facts(8, None, 0, 0)
        };
        assert_eq!(decide(&brisk, &L), Decision::Round { throttle: 0 });
        // Over three quarters of the link's rate it would leave more than the quarter the
        // rounds are held to: pause now.
        let fast = RoundFacts {
            dirty_rate: 0.8 * GIB,
            ..facts(8, None, 0, 0)
        };
        assert_eq!(decide(&fast, &L), Decision::SwitchOver);
        // A round that did not shrink a set whose pause is still over a millisecond: tried
        // again, up to PATIENCE rounds in a row; then paused (a small hot set rewritten at
        // once is not chased for ever).
        let stuck = RoundFacts {
            dirty_rate: GIB / 8.0,
            stalled: 1,
            ..facts(8, Some(9), 1, 0)
        };
        assert_eq!(decide(&stuck, &L), Decision::Round { throttle: 0 });
        let stuck = RoundFacts {
            stalled: PATIENCE,
            ..stuck
        };
        assert_eq!(decide(&stuck, &L), Decision::Round { throttle: 0 });
        let stuck = RoundFacts {
            stalled: PATIENCE + 1,
            ..stuck
        };
        assert_eq!(decide(&stuck, &L), Decision::SwitchOver);
        // Under RETRY_FROM_US (~0.5 ms here) a stalled set is paused at once.
        let small_stuck = RoundFacts {
            dirty_bytes: 512 << 10,
            previous_dirty_bytes: Some(600 << 10),
            stalled: 1,
            ..stuck
        };
        assert_eq!(decide(&small_stuck, &L), Decision::SwitchOver);
        // No dirty rate measured: the estimate alone decides, as before.
        assert_eq!(decide(&facts(8, None, 0, 0), &L), Decision::SwitchOver);
        // And never past max_rounds.
        assert_eq!(
            decide(&RoundFacts { rounds: 30, ..slow }, &L),
            Decision::SwitchOver
        );
    }
}
