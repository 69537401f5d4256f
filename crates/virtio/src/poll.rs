//! How long a worker keeps polling its avail ring after a batch before it sleeps on the kick.
//! On this kind of host a kick is a VM exit (~25 µs under KVM-PVM), so catching the driver's next
//! request by polling a few tens of µs saves more than it costs; but a guest that pauses longer
//! would only burn a host CPU, so the window adapts: it grows when the kick that woke the worker
//! came soon after it gave up polling (a longer poll would have caught it; the wait measured
//! includes the kick's own exit, hence up to twice the largest window counts as soon), and
//! shrinks when the worker slept much longer than that (the guest had gone quiet).

use std::time::Duration;

/// The largest window unless `VIREO_BLK_POLL_MAX_US` says otherwise (0 turns polling off).
const DEFAULT_MAX: Duration = Duration::from_micros(50);
/// The first non-zero window when growing from nothing.
const GROW_FROM: Duration = Duration::from_micros(4);

#[derive(Debug, Clone)]
pub(crate) struct PollWindow {
    now: Duration,
    max: Duration,
}

impl PollWindow {
    pub fn new(max: Duration) -> Self {
        PollWindow { now: max, max }
    }

    /// The window for a virtio-blk worker: [`DEFAULT_MAX`], or `VIREO_BLK_POLL_MAX_US` µs when set.
    pub fn for_block() -> Self {
        let max = std::env::var("VIREO_BLK_POLL_MAX_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(DEFAULT_MAX, Duration::from_micros);
        PollWindow::new(max)
    }

    /// How long to poll now; zero means sleep at once.
    pub fn window(&self) -> Duration {
        self.now
    }

    /// The worker polled for `polled` without finding work, then slept `slept` until something
    /// woke it; `kicked` is true when that was the driver.
    pub fn slept(&mut self, polled: Duration, slept: Duration, kicked: bool) {
        if kicked && slept <= 2 * self.max {
            self.now = (self.now * 2).max(GROW_FROM).min(self.max);
        } else if polled + slept > 4 * self.max {
            self.now /= 2;
            if self.now < GROW_FROM {
                self.now = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn the_window_shrinks_when_idle_grows_back_on_quick_kicks_and_stays_bounded() {
        let mut w = PollWindow::new(50 * US);
        assert_eq!(w.window(), 50 * US);
        for _ in 0..10 {
            w.slept(w.window(), 10_000 * US, true);
        }
        assert_eq!(w.window(), Duration::ZERO, "an idle guest ends polling");
        w.slept(Duration::ZERO, 150 * US, true);
        assert_eq!(
            w.window(),
            Duration::ZERO,
            "a slow guest does not bring polling back"
        );
        w.slept(Duration::ZERO, 90 * US, true);
        assert_eq!(
            w.window(),
            GROW_FROM,
            "a kick within two windows (exit included) does"
        );
        for _ in 0..10 {
            w.slept(w.window(), 5 * US, true);
        }
        assert_eq!(w.window(), 50 * US, "never beyond the maximum");
        let mut off = PollWindow::new(Duration::ZERO);
        off.slept(Duration::ZERO, US, true);
        assert_eq!(
            off.window(),
            Duration::ZERO,
            "a zero maximum keeps polling off"
        );
    }
}
