//! Storage QoS of one disk (Hyper-V 2012 R2): a maximum IOPS enforced by a token bucket and a
//! minimum IOPS watched by a monitor that raises an alert when it is not met. Both count IOs
//! normalized to 8 KiB ([`cost`]).
//!
//! Pure: every method takes the time (nanoseconds on any monotonic clock) as an argument, so
//! the rules are tested with a fake clock. The device's thread owns both (no locks) and does
//! the waiting itself, interruptibly (see `worker.rs`): the bucket only says how long.

use virtio_bindings::virtio_blk::*;

/// Bytes one normalized IO stands for.
pub const NORMALIZED_IO_BYTES: u64 = 8192;

/// Length of the minimum-IOPS measurement window.
pub const MIN_IOPS_WINDOW_NS: u64 = 5_000_000_000;

const NS_PER_SEC: u64 = 1_000_000_000;

/// A disk's QoS settings, in IOPS normalized to 8 KiB. `None`: no limit / no minimum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosConfig {
    pub max_iops: Option<u32>,
    pub min_iops: Option<u32>,
}

impl QosConfig {
    pub fn is_off(&self) -> bool {
        self.max_iops.is_none() && self.min_iops.is_none()
    }
}

/// The normalized IOs a request of type `kind` moving `data_len` bytes counts as: reads and
/// writes one per started 8 KiB (at least one), flush, discard and write-zeroes one each
/// (they move no data through the request but do cost the disk work), GET_ID and unknown
/// types none (GET_ID touches no storage; an unknown type fails at once).
pub fn cost(kind: u32, data_len: u64) -> u64 {
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => data_len.div_ceil(NORMALIZED_IO_BYTES).max(1),
        VIRTIO_BLK_T_FLUSH | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => 1,
        _ => 0,
    }
}

/// The burst a `max_iops` bucket holds: a tenth of a second of IOs (at least one). Small, so
/// the limit holds over any interval longer than that, yet enough that a millisecond timer
/// never starves a fast limit.
pub fn burst(max_iops: u32) -> u64 {
    u64::from(max_iops).div_ceil(10).max(1)
}

/// A token bucket of normalized IOs refilled at `rate` a second up to [`burst`].
///
/// A request may start once the bucket holds `min(cost, burst)` tokens, and then takes its whole
/// cost: the level can go below zero (a debt the following requests wait out). So a request
/// larger than the burst is not refused or starved, and over time the disk does at most
/// `rate` IOs a second: requests worth N IOs, the largest L, take at least
/// `(N - max(burst, L)) / rate` seconds from the first start to the last, whatever the bucket
/// held before.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    /// Capacity in token-nanoseconds (one token = `NS_PER_SEC` units), so refills are exact
    /// integer arithmetic.
    capacity: i128,
    level: i128,
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket for `max_iops` (≥ 1) at time `now_ns`.
    pub fn new(max_iops: u32, now_ns: u64) -> Self {
        let capacity = i128::from(burst(max_iops)) * i128::from(NS_PER_SEC);
        TokenBucket {
            rate: u64::from(max_iops.max(1)),
            capacity,
            level: capacity,
            last_ns: now_ns,
        }
    }

    fn refill(&mut self, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        let add = i128::from(elapsed) * i128::from(self.rate);
        self.level = (self.level + add).min(self.capacity);
    }

    /// Takes `cost` tokens if the request may start now (`None`), or says how many
    /// nanoseconds to wait before asking again (`Some`, at least 1).
    pub fn admit(&mut self, cost: u64, now_ns: u64) -> Option<u64> {
        self.refill(now_ns);
        if cost == 0 {
            // Costs the disk nothing (GET_ID): never held, not even behind a debt.
            return None;
        }
        let unit = i128::from(NS_PER_SEC);
        let need = i128::from(cost).saturating_mul(unit).min(self.capacity);
        if self.level >= need {
            self.level -= i128::from(cost) * unit;
            return None;
        }
        let missing = need - self.level;
        let rate = i128::from(self.rate);
        Some(
            u64::try_from((missing + rate - 1) / rate)
                .unwrap_or(u64::MAX)
                .max(1),
        )
    }
}

/// What the monitor's closing window means for the alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinIopsEvent {
    /// The minimum was not met while requests waited: an episode begins (log it once).
    Began { ios: u64, window_ns: u64 },
    /// A window met the minimum or had no demand: the episode is over.
    Ended,
}

/// Watches one disk against its `min_iops` over windows of [`MIN_IOPS_WINDOW_NS`].
///
/// Demand: the device was busy (a request executing, or held by the limiter, or waiting
/// behind one) for at least half the window; a guest that rarely asks is not "starved".
/// A window with demand in which fewer than `min_iops × window` normalized IOs completed is
/// unmet. The first unmet window starts an episode (one alert); the episode lasts until a
/// window is met or has no demand.
#[derive(Debug, Clone)]
pub struct MinIopsMonitor {
    min_iops: u64,
    window_start: u64,
    ios: u64,
    busy_ns: u64,
    busy_since: Option<u64>,
    /// Something happened in this window (a window of nothing needs no timer).
    touched: bool,
    active: bool,
}

impl MinIopsMonitor {
    pub fn new(min_iops: u32, now_ns: u64) -> Self {
        MinIopsMonitor {
            min_iops: u64::from(min_iops),
            window_start: now_ns,
            ios: 0,
            busy_ns: 0,
            busy_since: None,
            touched: false,
            active: false,
        }
    }

    /// The device started or stopped having work at `now_ns`.
    pub fn set_busy(&mut self, busy: bool, now_ns: u64) -> Option<MinIopsEvent> {
        let event = self.tick(now_ns);
        match (busy, self.busy_since) {
            (true, None) => self.busy_since = Some(now_ns),
            (false, Some(since)) => {
                self.busy_ns += now_ns.saturating_sub(since);
                self.busy_since = None;
            }
            // No change: an idle device saying it is idle does not need a timer.
            _ => return event,
        }
        self.touched = true;
        event
    }

    /// Requests worth `ios` normalized IOs completed at `now_ns`.
    pub fn completed(&mut self, ios: u64, now_ns: u64) -> Option<MinIopsEvent> {
        let event = self.tick(now_ns);
        self.ios += ios;
        self.touched = true;
        event
    }

    /// Closes the window if it is over (call it at any event or timer).
    pub fn tick(&mut self, now_ns: u64) -> Option<MinIopsEvent> {
        let len = now_ns.saturating_sub(self.window_start);
        if len < MIN_IOPS_WINDOW_NS {
            return None;
        }
        let mut busy = self.busy_ns;
        if let Some(since) = self.busy_since {
            busy += now_ns.saturating_sub(since);
            self.busy_since = Some(now_ns);
        }
        let demand = busy.saturating_mul(2) >= len;
        let wanted = u128::from(self.min_iops) * u128::from(len);
        let unmet = demand && u128::from(self.ios) * u128::from(NS_PER_SEC) < wanted;
        let ios = self.ios;
        self.window_start = now_ns;
        self.ios = 0;
        self.busy_ns = 0;
        self.touched = self.busy_since.is_some();
        match (unmet, self.active) {
            (true, false) => {
                self.active = true;
                Some(MinIopsEvent::Began {
                    ios,
                    window_ns: len,
                })
            }
            (false, true) => {
                self.active = false;
                Some(MinIopsEvent::Ended)
            }
            _ => None,
        }
    }

    /// When the current window ends, if anything in it needs judging; `None` for an idle
    /// window outside an episode (no timer needed).
    pub fn deadline(&self) -> Option<u64> {
        (self.touched || self.active).then_some(self.window_start + MIN_IOPS_WINDOW_NS)
    }

    pub fn active(&self) -> bool {
        self.active
    }

    pub fn min_iops(&self) -> u64 {
        self.min_iops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000 * MS;

    #[test]
    fn costs_are_normalized_to_8k() {
        assert_eq!(cost(VIRTIO_BLK_T_IN, 512), 1);
        assert_eq!(cost(VIRTIO_BLK_T_OUT, 8192), 1);
        assert_eq!(cost(VIRTIO_BLK_T_OUT, 8193), 2);
        assert_eq!(cost(VIRTIO_BLK_T_IN, 512 << 10), 64);
        assert_eq!(cost(VIRTIO_BLK_T_IN, 0), 1);
        assert_eq!(cost(VIRTIO_BLK_T_FLUSH, 0), 1);
        assert_eq!(cost(VIRTIO_BLK_T_DISCARD, 16), 1);
        assert_eq!(cost(VIRTIO_BLK_T_WRITE_ZEROES, 32), 1);
        assert_eq!(cost(VIRTIO_BLK_T_GET_ID, 20), 0);
        assert_eq!(cost(999, 4096), 0);
        assert_eq!((burst(1), burst(10), burst(20), burst(105)), (1, 1, 2, 11));
    }

    /// Drives a bucket with a fake clock: every request waits as told, then starts.
    fn run(bucket: &mut TokenBucket, costs: &[u64], mut now: u64) -> (u64, Vec<u64>) {
        let mut starts = Vec::new();
        for &c in costs {
            while let Some(wait) = bucket.admit(c, now) {
                assert!(wait > 0);
                now += wait;
            }
            starts.push(now);
        }
        (now, starts)
    }

    #[test]
    fn burst_passes_at_once_then_the_rate_holds() {
        let mut b = TokenBucket::new(20, 0);
        let (end, starts) = run(&mut b, &[1; 22], 0);
        // Two (the burst) start at once, then one every 50 ms.
        assert_eq!(&starts[..3], &[0, 0, 50 * MS]);
        assert_eq!(end, 20 * 50 * MS);
        // The bound the tests rely on: N IOs take at least (N - max(burst, largest)) / rate.
        assert!(end >= (22 - burst(20)) * S / 20);
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let mut b = TokenBucket::new(100, 0);
        let (t, _) = run(&mut b, &[1; 10], 0);
        assert_eq!(t, 0, "the burst of 10 is free");
        // An hour idle gives back the burst, not an hour of IOs.
        let later = t + 3600 * S;
        let (end, _) = run(&mut b, &[1; 30], later);
        assert_eq!(end - later, 20 * 10 * MS);
    }

    #[test]
    fn a_request_larger_than_the_burst_goes_then_its_debt_is_waited_out() {
        let mut b = TokenBucket::new(10, 0);
        // 64 IOs (a 512 KiB read) with a burst of 1: starts at once, then 6.4 s of debt.
        assert_eq!(b.admit(64, 0), None);
        let (end, _) = run(&mut b, &[1], 0);
        assert_eq!(end, 6400 * MS);
        // A zero-cost request (GET_ID) never waits, even in debt.
        let mut b = TokenBucket::new(10, 0);
        assert_eq!(b.admit(64, 0), None);
        assert_eq!(b.admit(0, 0), None);
    }

    #[test]
    fn long_run_rate_is_the_limit_whatever_the_sizes() {
        let mut b = TokenBucket::new(250, 0);
        let costs: Vec<u64> = (0..500).map(|i| [1, 8, 64, 3][i % 4]).collect();
        let total: u64 = costs.iter().sum();
        let (end, _) = run(&mut b, &costs, 0);
        let lower = (total - burst(250).max(64)) * S / 250;
        let upper = total * S / 250;
        assert!(
            (lower..=upper).contains(&end),
            "{end} not in {lower}..={upper}"
        );
    }

    #[test]
    fn a_clock_going_backwards_does_not_mint_tokens() {
        let mut b = TokenBucket::new(10, 5 * S);
        assert_eq!(b.admit(1, 5 * S), None);
        assert!(b.admit(1, S).is_some());
    }

    #[test]
    fn min_iops_alert_needs_demand_and_a_shortfall_and_fires_once_per_episode() {
        let mut m = MinIopsMonitor::new(50, 0);
        // Busy all the time, 10 IOs a second: unmet.
        assert_eq!(m.set_busy(true, 0), None);
        let mut events = Vec::new();
        for s in 1..=15 {
            events.extend(m.completed(10, s * S));
        }
        assert_eq!(
            events,
            vec![MinIopsEvent::Began {
                ios: 40,
                window_ns: 5 * S
            }]
        );
        assert!(m.active());
        // Now 60 a second: met, the episode ends.
        let mut events = Vec::new();
        for s in 16..=21 {
            events.extend(m.completed(60, s * S));
        }
        assert_eq!(events, vec![MinIopsEvent::Ended]);
        assert!(!m.active());
    }

    #[test]
    fn a_guest_that_rarely_asks_is_not_starved() {
        let mut m = MinIopsMonitor::new(50, 0);
        // One 10 ms request a second: busy 1% of the time, 1 IO a second.
        let mut events = Vec::new();
        for s in 0..20 {
            events.extend(m.set_busy(true, s * S));
            events.extend(m.completed(1, s * S + 10 * MS));
            events.extend(m.set_busy(false, s * S + 10 * MS));
        }
        assert_eq!(events, vec![]);
        assert_eq!(m.deadline(), Some(20 * S));
    }

    #[test]
    fn a_long_wait_is_demand_and_an_idle_window_ends_the_episode() {
        let mut m = MinIopsMonitor::new(50, 0);
        m.set_busy(true, 0);
        // One request held 6 s by the limiter, nothing else: the timer closes the window.
        assert_eq!(m.deadline(), Some(5 * S));
        assert!(matches!(
            m.tick(5 * S),
            Some(MinIopsEvent::Began { ios: 0, .. })
        ));
        m.completed(64, 6 * S);
        m.set_busy(false, 6 * S);
        assert_eq!(m.deadline(), Some(10 * S));
        // Busy 1 s of the next 5: no demand, the episode is over.
        assert_eq!(m.tick(10 * S), Some(MinIopsEvent::Ended));
        assert_eq!(m.deadline(), None, "idle: no timer");
        // A clock that never reaches the window's end judges nothing.
        assert_eq!(m.tick(12 * S), None);
    }
}
