//! The guest's side of a migration's pause: a thread reads the probe's dirty-page counter
//! (status page + 24, bumped after every page the guest writes) on both sides every ~0.1 ms
//! and remembers every move. The counter only grows, and before the destination's guest runs its
//! copy of the counter can only hold values the source had: so the gap is from the source's
//! last move to the first time the destination shows a value **above the source's last
//! one**. That needs no "is it running yet" question to either VMM (whose round trip, several
//! ms on a busy host, would add to the gap) and no arming read.
//!
//! A move happened somewhere between the read before the one that saw it and that read; on a
//! busy host a watcher may not run for milliseconds, so that window can be wide. The gap is
//! taken from the earliest the source's last move can have happened (the read before it) to
//! the latest the destination's first move past it can have (the read that saw it): never
//! shorter than the guest's real gap, and never negative because one watcher ran late.
//!
//! The watchers run as real-time threads (`SCHED_FIFO`, the bench runs as root): a woken
//! watcher takes its CPU at once. As normal threads they were woken onto the CPU the guest's
//! vCPU ran on and waited there up to ~1.5 ms (traced: the other CPU idle meanwhile), so the
//! resolution was the scheduler's, not `READ_EVERY`, and it widened both VMMs' gaps.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// GPA of the probe's dirty-workload page counter (docs/probe-protocol.md).
pub const DIRTY_PAGES: u64 = 0x80000 + 24;

/// A watcher's pause between reads.
const READ_EVERY: Duration = Duration::from_micros(100);

/// Both sides' counters, read by one thread: a wake-up per `READ_EVERY` for the two reads,
/// not one per side. Each wake-up of a real-time watcher preempts whatever runs on its CPU
/// (the guest's vCPU, the migration's threads, on either VMM), so fewer is better.
pub struct Watch {
    stop: Arc<AtomicBool>,
    sides: [Side; 2],
    thread: JoinHandle<Result<[Seen; 2], String>>,
}

/// What one side's reads publish while the watcher runs.
#[derive(Clone, Default)]
struct Side {
    current: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
}

/// One side's counter: `None` while it cannot be read.
pub type Read = Box<dyn FnMut() -> Result<Option<u64>, String> + Send>;

/// One value a watcher saw change.
#[derive(Clone, Copy, Debug)]
pub struct Move {
    /// The read that saw the new value.
    pub seen: Instant,
    /// The read before it (the value changed after this): the same as `seen` for the first.
    pub after: Instant,
    pub value: u64,
}

/// What a watcher saw.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Every value read that differed from the one before.
    pub moves: Vec<Move>,
    pub reads: u64,
    before: Option<Instant>,
}

impl Seen {
    fn last(&self) -> Option<Move> {
        self.moves.last().copied()
    }

    fn record(&mut self, v: u64, now: Instant) {
        self.reads += 1;
        if self.last().is_none_or(|m| m.value != v) {
            self.moves.push(Move {
                seen: now,
                after: self.before.unwrap_or(now),
                value: v,
            });
        }
        self.before = Some(now);
    }
}

impl Watch {
    /// Reads the source's and the destination's counters in a loop until stopped (or `limit`
    /// passes).
    pub fn start(source: Read, dest: Read, limit: Duration) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sides = [Side::default(), Side::default()];
        let published = sides.clone();
        let thread = std::thread::spawn(move || {
            if let Err(e) = run_realtime() {
                eprintln!(
                    "warning: the counter watcher is not real-time ({e}); the gaps include \
                     its wait for a CPU"
                );
            }
            let started = Instant::now();
            let mut reads = [source, dest];
            let mut seen = [Seen::default(), Seen::default()];
            while !flag.load(Ordering::Relaxed) && started.elapsed() < limit {
                for ((read, seen), side) in reads.iter_mut().zip(&mut seen).zip(&published) {
                    if let Some(v) = read()? {
                        seen.record(v, Instant::now());
                        side.current.store(v, Ordering::Relaxed);
                        side.reads.fetch_add(1, Ordering::Release);
                    }
                }
                // Not a spin: a watcher reading flat out would be one more runnable thread on
                // this 2-core host beside the guest's vCPU and the migration's threads (on
                // either VMM's side), taking CPU from the very migration it times. So the
                // gap's resolution is this pause, the same for both VMMs.
                std::thread::sleep(READ_EVERY);
            }
            Ok(seen)
        });
        Watch {
            stop,
            sides,
            thread,
        }
    }

    /// The value of the source once it no longer moves (the migration is over): read twice
    /// more after this call, so it is not a value from before the pause.
    pub fn source_settled(&self, limit: Duration) -> u64 {
        let side = &self.sides[0];
        let from = side.reads.load(Ordering::Acquire);
        let deadline = Instant::now() + limit;
        while side.reads.load(Ordering::Acquire) < from + 2
            && Instant::now() < deadline
            && !self.thread.is_finished()
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        side.current.load(Ordering::Relaxed)
    }

    /// Waits (at most `limit`) until the destination has read a value above `value`.
    pub fn dest_above(&self, value: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.sides[1].current.load(Ordering::Relaxed) <= value {
            if Instant::now() > deadline || self.thread.is_finished() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// What the source's and the destination's reads saw.
    pub fn finish(self) -> Result<(Seen, Seen), String> {
        self.stop.store(true, Ordering::Relaxed);
        let [s, d] = self
            .thread
            .join()
            .map_err(|_| "counter watcher panicked".to_string())??;
        Ok((s, d))
    }
}

/// Makes the calling thread `SCHED_FIFO` at the lowest real-time priority.
fn run_realtime() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The source's last move and the destination's first move past it, as wall-clock times
/// (`HH:MM:SS.micros` UTC, the workers' log format), to line the gap up with their logs.
pub fn gap_ends(source: &Seen, dest: &Seen) -> Option<(String, String)> {
    let last = source.last()?;
    let first = dest.moves.iter().find(|m| m.value > last.value)?;
    Some((wall_clock(last.after), wall_clock(first.seen)))
}

/// `t` as the workers' logs stamp it (`HH:MM:SS.micros` UTC).
pub fn wall_clock(t: Instant) -> String {
    let (now, wall) = (Instant::now(), std::time::SystemTime::now());
    let at = wall - now.duration_since(t);
    let d = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_micros()
    )
}

/// The guest-visible gap, milliseconds: from the source's last move to the destination's
/// first value above the source's last, each end taken at its widest (module docs).
pub fn gap_ms(source: &Seen, dest: &Seen) -> Result<f64, String> {
    let Some(Move {
        after: stopped,
        value: last,
        ..
    }) = source.last()
    else {
        return Err(format!(
            "the source's counter was never read ({} reads)",
            source.reads
        ));
    };
    let Some(&Move { seen: resumed, .. }) = dest.moves.iter().find(|m| m.value > last) else {
        return Err(format!(
            "the destination's counter never went past the source's last value {last} \
             ({} reads)",
            dest.reads
        ));
    };
    // The source's last move came before the destination's first past it; `stopped` is no
    // later than it, `resumed` no earlier, so this cannot be negative.
    Ok(resumed.saturating_duration_since(stopped).as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gap_ends_at_the_first_value_past_the_sources_last() {
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        let mv = |after, seen, value| Move {
            seen: at(seen),
            after: at(after),
            value,
        };
        let source = Seen {
            moves: vec![mv(0, 0, 10), mv(4, 5, 20)],
            reads: 9,
            before: None,
        };
        // Older copies (pages of earlier rounds) and the source's own last value arrive
        // before the guest runs there: they do not end the gap. The gap runs from the read
        // before the source's last move to the read that saw the destination's first.
        let dest = Seen {
            moves: vec![
                mv(1, 1, 0),
                mv(2, 3, 10),
                mv(7, 8, 20),
                mv(11, 12, 21),
                mv(12, 13, 30),
            ],
            reads: 9,
            before: None,
        };
        assert_eq!(gap_ms(&source, &dest).unwrap(), 8.0);
        let never = Seen {
            moves: vec![mv(7, 8, 20)],
            reads: 3,
            before: None,
        };
        assert!(gap_ms(&source, &never).is_err());
        // A source watcher that ran late (saw the last move after the destination's guest
        // had moved on): the widest window still holds the real gap, never below zero.
        let late = Seen {
            moves: vec![mv(0, 0, 10), mv(2, 15, 20)],
            reads: 4,
            before: None,
        };
        assert_eq!(gap_ms(&late, &dest).unwrap(), 10.0);
    }
}
