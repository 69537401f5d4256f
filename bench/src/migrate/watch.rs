//! The guest's side of a migration's pause: a thread reads the probe's dirty-page counter
//! (status page + 24, bumped every ≤ 512 pages, ~0.1 ms) on one side as fast as it can and
//! remembers when it last saw it move (source) or first saw it move (destination). The gap
//! between the source's last move and the destination's first is the pause the guest lived,
//! whatever either VMM's own clock says.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// GPA of the probe's dirty-workload page counter (docs/probe-protocol.md).
pub const DIRTY_PAGES: u64 = 0x80000 + 24;

pub struct Watch {
    stop: Arc<AtomicBool>,
    moved: Arc<AtomicBool>,
    thread: JoinHandle<Result<Seen, String>>,
}

/// What a watcher saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen {
    /// The last time the counter moved (source side).
    pub last_move: Option<Instant>,
    /// The first time it moved after `read` first answered (destination side).
    pub first_move: Option<Instant>,
    pub reads: u64,
}

impl Watch {
    /// Reads `read` in a loop until stopped (or `limit` passes). `read` answers `None` while
    /// its side's guest does not run (the destination's counter changes while pages arrive,
    /// before its guest runs: those changes must not count as the guest moving).
    pub fn start(
        mut read: impl FnMut() -> Result<Option<u64>, String> + Send + 'static,
        limit: Duration,
    ) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let moved = Arc::new(AtomicBool::new(false));
        let moved_flag = moved.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut seen = Seen::default();
            let mut last: Option<u64> = None;
            let mut armed_at: Option<u64> = None;
            while !flag.load(Ordering::Relaxed) && started.elapsed() < limit {
                let Some(v) = read()? else {
                    std::thread::sleep(Duration::from_micros(50));
                    continue;
                };
                let now = Instant::now();
                seen.reads += 1;
                if last.is_some_and(|l| l != v) {
                    seen.last_move = Some(now);
                }
                last = Some(v);
                match armed_at {
                    None => armed_at = Some(v),
                    Some(a) if v != a && seen.first_move.is_none() => {
                        seen.first_move = Some(now);
                        moved_flag.store(true, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            Ok(seen)
        });
        Watch {
            stop,
            moved,
            thread,
        }
    }

    /// Waits (at most `limit`) until the counter has moved since `read` first answered.
    pub fn wait_moved(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.moved.load(Ordering::Relaxed) {
            if Instant::now() > deadline || self.thread.is_finished() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    pub fn finish(self) -> Result<Seen, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| "counter watcher panicked".to_string())?
    }
}

/// The guest-visible gap, milliseconds.
pub fn gap_ms(source: &Seen, dest: &Seen) -> Result<f64, String> {
    match (source.last_move, dest.first_move) {
        (Some(a), Some(b)) if b >= a => Ok((b - a).as_secs_f64() * 1e3),
        (Some(_), Some(_)) => {
            Err("the destination's counter moved before the source's stopped".into())
        }
        _ => Err(format!(
            "the counter was not seen moving (source {} reads, destination {} reads)",
            source.reads, dest.reads
        )),
    }
}
