//! Who gets the CPU during a live migration's pre-copy (docs/migration.md, "The guest's vCPU
//! during pre-copy"). On a host with few cores the stream threads of both sides (TLS,
//! compression, pread/pwrite) outnumber the cores, and the guest's vCPU waited behind them
//! for 15–25 ms at a time: its last move on the source fell that long before the pause. So
//! while the guest runs, the copy threads step back (a higher nice value) and the vCPU
//! preempts them; in the pause, where nothing of the guest runs, they copy at full priority.
//!
//! The source knows when the pause comes (its last pass runs on threads that never stepped
//! back). A destination thread does not, so it steps forward after every `RoundEnd` (the next
//! pass may be the pause's) and back again once the pass is larger than a pause's would be.
//!
//! Off unless `VIREO_MIGRATION_NICE` asks for it (see `DEFAULT_STEP` for why).

/// The environment variable that sets how many nice steps the copy threads step back
/// (`0`, the default: they do not).
pub const ENV: &str = "VIREO_MIGRATION_NICE";
/// Off by default: measured on the shared 2-core host (load 11–15, docs/migration.md), a
/// step of 5 or 10 lost the copy threads' CPU to every other process at normal priority, the
/// link rate fell to 9–95 MB/s, auto-converge parked the guest up to 91 % for longer, and
/// neither the guest's stall before the pause nor its gap shrank; the total went from
/// 0.7–2.2 s to 1.5–13 s. At nice 10 a copy thread weighs ~1/10 of a nice-0 vCPU thread, which
/// is what an otherwise idle host would need; that case is not measured yet.
const DEFAULT_STEP: i32 = 0;
/// A destination pass that has brought this many bytes on one stream is not the pause's last
/// pass (that one is sized to fit `max_downtime`: a few MiB over all streams).
const PAUSE_PASS_MAX: u64 = 4 << 20;

/// The step from the environment (unparsable or out of range: the default).
pub fn step() -> i32 {
    std::env::var(ENV)
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|n| (0..=19).contains(n))
        .unwrap_or(DEFAULT_STEP)
}

/// Steps the calling source copy thread back for a live pass (it ends with the pass).
pub(crate) fn source_live_pass() {
    let step = step();
    if step > 0 {
        crate::thread_priority::lower_by(step);
    }
}

/// A destination stream thread's priority: back while a live pass streams in, forward from a
/// `RoundEnd` until the pass after it proves larger than a pause's.
pub(crate) struct ReceiverPriority {
    /// The thread's own nice value, `None` when stepping back is off or failed.
    normal: Option<i32>,
    step: i32,
    /// Bytes received since the last `RoundEnd` (or since the start).
    since_round_end: u64,
    lowered: bool,
}

impl ReceiverPriority {
    /// Call on the receiving thread: it starts stepped back (the full pass comes first).
    pub(crate) fn start() -> ReceiverPriority {
        let step = step();
        let normal = if step > 0 {
            crate::thread_priority::nice()
        } else {
            None
        };
        let mut p = ReceiverPriority {
            normal,
            step,
            since_round_end: 0,
            lowered: false,
        };
        p.apply(true);
        p
    }

    /// `bytes` more arrived in the current pass.
    pub(crate) fn received(&mut self, bytes: u64) {
        self.since_round_end += bytes;
        if should_step_back(self.since_round_end) && !self.lowered {
            self.apply(true);
        }
    }

    /// A pass ended: the next one may be the pause's.
    pub(crate) fn round_end(&mut self) {
        self.since_round_end = 0;
        if self.lowered {
            self.apply(false);
        }
    }

    fn apply(&mut self, lower: bool) {
        let Some(normal) = self.normal else {
            return;
        };
        let target = if lower { normal + self.step } else { normal };
        if crate::thread_priority::set_nice(target) {
            self.lowered = lower;
        } else if !lower {
            // Not allowed to step forward again (no CAP_SYS_NICE): stop moving at all, the
            // pause's pages would otherwise arrive at the lower priority every time.
            tracing::debug!("migration receiver: cannot restore its priority; staying as is");
            self.normal = None;
        }
    }
}

/// Whether a destination thread that received `bytes` since the last `RoundEnd` is in a live
/// pass (a pause's last pass is smaller).
fn should_step_back(bytes: u64) -> bool {
    bytes > PAUSE_PASS_MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_larger_than_a_pause_steps_back() {
        assert!(!should_step_back(0));
        assert!(!should_step_back(PAUSE_PASS_MAX));
        assert!(should_step_back(PAUSE_PASS_MAX + 1));
    }

    #[test]
    fn a_receiver_steps_back_then_forward_at_a_round_end() {
        std::thread::spawn(|| {
            let normal = crate::thread_priority::nice().unwrap();
            let mut p = ReceiverPriority {
                normal: Some(normal),
                step: 2,
                since_round_end: 0,
                lowered: false,
            };
            p.apply(true);
            assert_eq!(crate::thread_priority::nice(), Some(normal + 2));
            p.round_end();
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            if root {
                assert_eq!(crate::thread_priority::nice(), Some(normal));
                p.received(1 << 20);
                assert_eq!(
                    crate::thread_priority::nice(),
                    Some(normal),
                    "small: pause-sized"
                );
                p.received(PAUSE_PASS_MAX);
                assert_eq!(crate::thread_priority::nice(), Some(normal + 2));
            }
        })
        .join()
        .unwrap();
    }
}
