//! Why a VM stopped, decided once: the first reason recorded wins, and everyone waiting on it
//! (the main thread, the vCPU threads checking between exits) sees the same answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// How a VM run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote `status` to the power-off port.
    PowerOff(u8),
    /// The guest asked for a reset (i8042 0xfe or a KVM reset event); Vireo stops the VM.
    Reset,
    /// The host asked the VM to stop (SIGTERM/SIGINT, or [`crate::VmHandle::request_stop`]).
    Stopped,
    /// A vCPU hit an error it cannot continue from; the message names vCPU, reason and RIP.
    Error(String),
}

#[derive(Default)]
pub struct ExitState {
    set: AtomicBool,
    reason: Mutex<Option<VmExit>>,
    cv: Condvar,
}

impl ExitState {
    /// Records `exit` unless a reason is already recorded.
    pub fn set(&self, exit: VmExit) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(exit);
            self.set.store(true, Ordering::SeqCst);
            self.cv.notify_all();
        }
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for a reason.
    pub fn wait(&self, timeout: Duration) -> Option<VmExit> {
        let r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let (r, _) = self
            .cv
            .wait_timeout_while(r, timeout, |r| r.is_none())
            .unwrap_or_else(|p| p.into_inner());
        r.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitState::default();
        assert_eq!(s.wait(Duration::from_millis(1)), None);
        s.set(VmExit::PowerOff(3));
        s.set(VmExit::Reset);
        assert!(s.is_set());
        assert_eq!(s.wait(Duration::ZERO), Some(VmExit::PowerOff(3)));
    }
}
