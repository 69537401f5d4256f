//! The storage-QoS glue of one device thread: its clock, its token bucket and minimum-IOPS
//! monitor (`qos.rs`, pure), the counters they feed and the alert log lines. Owned by the
//! device's thread alone; exists only when the disk has a QoS setting, so a disk without one
//! reads no clock and takes no branch beyond an `Option` check per request.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::qos::{MinIopsEvent, MinIopsMonitor, QosConfig, TokenBucket};
use super::BlockCounters;

pub(crate) struct Gate {
    origin: Instant,
    bucket: Option<TokenBucket>,
    monitor: Option<MinIopsMonitor>,
    /// When the request at the head of the queue was held back (for `throttled_ns`).
    held_since: Option<u64>,
    /// When the bucket will admit the held request.
    retry_at: Option<u64>,
    /// How the disk is named in log lines (its serial or id).
    label: String,
}

impl Gate {
    /// `None` when `qos` asks for nothing.
    pub fn new(qos: QosConfig, label: String) -> Option<Gate> {
        if qos.is_off() {
            return None;
        }
        Some(Gate {
            origin: Instant::now(),
            bucket: qos.max_iops.map(|n| TokenBucket::new(n, 0)),
            monitor: qos.min_iops.map(|n| MinIopsMonitor::new(n, 0)),
            held_since: None,
            retry_at: None,
            label,
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The thread woke to serve the queue.
    pub fn serve_started(&mut self, counters: &BlockCounters) {
        let now = self.now();
        if let Some(since) = self.held_since.take() {
            counters
                .throttled_ns
                .fetch_add(now.saturating_sub(since), Ordering::Relaxed);
        }
        let event = self.monitor.as_mut().and_then(|m| m.tick(now));
        self.report(event, counters);
    }

    /// May a request of `cost` normalized IOs run now? When not, it stays queued and the
    /// thread comes back at [`Gate::timeout_ms`].
    pub fn admit(&mut self, cost: u64, counters: &BlockCounters) -> bool {
        let now = self.now();
        let event = self.monitor.as_mut().and_then(|m| m.set_busy(true, now));
        self.report(event, counters);
        match self.bucket.as_mut().and_then(|b| b.admit(cost, now)) {
            None => true,
            Some(wait) => {
                self.held_since = Some(now);
                self.retry_at = Some(now.saturating_add(wait));
                false
            }
        }
    }

    /// A request of `cost` normalized IOs finished.
    pub fn completed(&mut self, cost: u64, counters: &BlockCounters) {
        let now = self.now();
        let event = self.monitor.as_mut().and_then(|m| m.completed(cost, now));
        self.report(event, counters);
    }

    /// Serving stopped: the queue is empty, or its head is held (`held`).
    pub fn serve_ended(&mut self, held: bool, counters: &BlockCounters) {
        if held {
            return;
        }
        self.retry_at = None;
        let now = self.now();
        let event = self.monitor.as_mut().and_then(|m| m.set_busy(false, now));
        self.report(event, counters);
    }

    /// The device thread parked for a VM pause: paused time is neither throttling nor demand.
    pub fn pause(&mut self, counters: &BlockCounters) {
        let now = self.now();
        if let Some(since) = self.held_since.take() {
            counters
                .throttled_ns
                .fetch_add(now.saturating_sub(since), Ordering::Relaxed);
        }
        self.retry_at = None;
        let event = self.monitor.as_mut().and_then(|m| m.set_busy(false, now));
        self.report(event, counters);
    }

    /// How long the thread may sleep before it must serve again (a held request, the end of a
    /// measurement window); -1: until kicked.
    pub fn timeout_ms(&self) -> i32 {
        let deadline = [
            self.retry_at,
            self.monitor.as_ref().and_then(|m| m.deadline()),
        ]
        .into_iter()
        .flatten()
        .min();
        match deadline {
            None => -1,
            Some(at) => {
                let ms = at.saturating_sub(self.now()).div_ceil(1_000_000);
                i32::try_from(ms).unwrap_or(i32::MAX)
            }
        }
    }

    fn report(&self, event: Option<MinIopsEvent>, counters: &BlockCounters) {
        let Some(monitor) = &self.monitor else {
            return;
        };
        match event {
            None => {}
            Some(MinIopsEvent::Began { ios, window_ns }) => {
                counters.min_iops_alerts.fetch_add(1, Ordering::Relaxed);
                counters
                    .min_iops_alert_active
                    .store(true, Ordering::Relaxed);
                let secs = window_ns as f64 / 1e9;
                tracing::warn!(
                    "virtio-blk {}: minimum IOPS not met: {ios} normalized IOs in {secs:.1} s \
                     ({:.1}/s) while requests were waiting; the minimum is {}/s",
                    self.label,
                    ios as f64 / secs,
                    monitor.min_iops()
                );
            }
            Some(MinIopsEvent::Ended) => {
                counters
                    .min_iops_alert_active
                    .store(false, Ordering::Relaxed);
                tracing::info!(
                    "virtio-blk {}: minimum IOPS met again (or no demand)",
                    self.label
                );
            }
        }
    }
}
