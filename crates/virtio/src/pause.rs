//! Quiescing a device thread for a VM pause. The controller asks, the thread parks at its next
//! request boundary (never inside a request: what it took from the ring is executed and its
//! used-ring entry published first) and says so; the controller's call returns only then.
//!
//! Why a mutex and not only the atomic: "parked" must be read and written together with
//! "requested", or a resume followed at once by a pause could see the old "parked" of a thread
//! that is about to serve again.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::state::ParkedReport;

#[derive(Debug, Default)]
struct State {
    requested: bool,
    parked: bool,
    /// What the thread reported when it parked (save/restore reads it while parked).
    report: Option<ParkedReport>,
}

/// Shared by a device (controller side) and its worker thread.
#[derive(Debug)]
pub(crate) struct PauseCtl {
    /// Mirror of `State::requested`, checked between requests without the lock.
    requested: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
    /// Wakes the thread from its event loop when the request changes.
    wake: EventFd,
}

/// What the thread should do after [`PauseCtl::poll`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Park {
    /// Not paused: serve as usual.
    Run,
    /// Paused: serve nothing, wait for the wake fd or the stop fd.
    Parked,
    /// Just resumed: serve the queues once (kicks that came while parked were drained).
    Resumed,
}

impl PauseCtl {
    pub fn new() -> std::io::Result<PauseCtl> {
        Ok(PauseCtl {
            requested: AtomicBool::new(false),
            state: Mutex::default(),
            cv: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// A controller whose thread parks at its first request boundary, before it serves
    /// anything: a device restored into a paused VM serves from the resume on.
    pub fn parked_from_start() -> std::io::Result<PauseCtl> {
        let ctl = PauseCtl::new()?;
        ctl.lock().requested = true;
        ctl.requested.store(true, Ordering::SeqCst);
        Ok(ctl)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fd to add to the thread's event loop.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Between two requests: should the thread stop taking requests?
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Controller: asks the thread to park without waiting (so several threads can be asked
    /// before [`PauseCtl::pause`] waits for each).
    pub fn request(&self) {
        let mut s = self.lock();
        s.requested = true;
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    /// Controller: asks the thread to park and waits until it has, at most `timeout`.
    /// False when it did not park in time (it still will at its next request boundary).
    pub fn pause(&self, timeout: Duration) -> bool {
        let mut s = self.lock();
        s.requested = true;
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        let deadline = Instant::now() + timeout;
        while !s.parked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Controller: lets the thread serve again (does not wait for it).
    pub fn resume(&self) {
        let mut s = self.lock();
        s.requested = false;
        self.requested.store(false, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    /// Controller: what the thread reported when it parked; `None` unless it is parked now.
    pub fn parked_report(&self) -> Option<ParkedReport> {
        let s = self.lock();
        if s.parked {
            s.report.clone()
        } else {
            None
        }
    }

    /// Thread: at a request boundary (top of its loop), parks or unparks as asked. On parking
    /// it reports where it stands (`report` runs before the controller's pause returns).
    pub fn poll(&self, report: impl FnOnce() -> ParkedReport) -> Park {
        let _ = self.wake.read();
        let mut s = self.lock();
        match (s.requested, s.parked) {
            (true, true) => Park::Parked,
            (true, false) => {
                s.report = Some(report());
                s.parked = true;
                self.cv.notify_all();
                Park::Parked
            }
            (false, true) => {
                s.parked = false;
                s.report = None;
                Park::Resumed
            }
            (false, false) => Park::Run,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_waits_for_the_thread_and_resume_lets_it_run() {
        let ctl = Arc::new(PauseCtl::new().unwrap());
        assert_eq!(ctl.poll(ParkedReport::default), Park::Run);
        // Nobody polls: the pause times out, and says so.
        assert!(!ctl.pause(Duration::from_millis(20)));
        assert!(ctl.requested());
        let t = {
            let ctl = ctl.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                ctl.poll(ParkedReport::default)
            })
        };
        assert!(ctl.pause(Duration::from_secs(10)));
        assert_eq!(t.join().unwrap(), Park::Parked);
        // Already parked: a second pause returns at once.
        assert!(ctl.pause(Duration::ZERO));
        assert_eq!(ctl.parked_report(), Some(ParkedReport::default()));
        assert_eq!(ctl.poll(ParkedReport::default), Park::Parked);
        ctl.resume();
        ctl.resume();
        assert!(!ctl.requested());
        assert_eq!(ctl.poll(ParkedReport::default), Park::Resumed);
        assert_eq!(
            ctl.parked_report(),
            None,
            "a running thread's report is stale"
        );
        assert_eq!(ctl.poll(ParkedReport::default), Park::Run);
    }
}
