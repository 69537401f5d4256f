//! The thread behind an active device: started by `activate`, stopped and joined by `reset` (or
//! when the device is dropped), so no worker outlives its device's access to guest memory.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pause::PauseCtl;

/// A running device thread and the eventfd that asks it to stop.
#[derive(Debug)]
pub(crate) struct Worker {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
    /// Set for threads that can park for a VM pause ([`crate::pause`]).
    pause: Option<Arc<PauseCtl>>,
}

impl Worker {
    /// The eventfd a worker watches to learn it must stop; register it before [`Worker::spawn`].
    pub fn stop_fd() -> io::Result<EventFd> {
        EventFd::new(EFD_NONBLOCK)
    }

    /// Starts `body` on a thread named `name`; writing `stop` must make `body` return.
    pub fn spawn(
        name: String,
        stop: &EventFd,
        body: impl FnOnce() + Send + 'static,
    ) -> io::Result<Worker> {
        let stop = stop.try_clone()?;
        let handle = std::thread::Builder::new().name(name).spawn(body)?;
        Ok(Worker {
            stop,
            handle: Some(handle),
            pause: None,
        })
    }

    /// The thread parks when `pause` asks it to (its body polls `pause`).
    pub fn with_pause(mut self, pause: Arc<PauseCtl>) -> Worker {
        self.pause = Some(pause);
        self
    }

    /// Asks the thread to park at its next request boundary without waiting for it.
    pub fn request_pause(&self) {
        if let Some(p) = &self.pause {
            p.request();
        }
    }

    /// Parks the thread at its next request boundary; false if it did not within `timeout`.
    /// A thread without pause support has nothing to quiesce and returns true.
    pub fn pause(&self, timeout: Duration) -> bool {
        self.pause.as_ref().is_none_or(|p| p.pause(timeout))
    }

    /// What the thread reported when it parked; `None` unless it is parked now.
    pub fn parked_report(&self) -> Option<crate::state::ParkedReport> {
        self.pause.as_ref().and_then(|p| p.parked_report())
    }

    pub fn resume(&self) {
        if let Some(p) = &self.pause {
            p.resume();
        }
    }

    /// Asks the thread to stop and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(handle) = self.handle.take() {
            if let Err(e) = self.stop.write(1) {
                tracing::error!("cannot signal device worker to stop: {e}");
            }
            if handle.join().is_err() {
                tracing::error!("device worker panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Level-triggered epoll over a device's eventfds, each tagged with a small token.
pub(crate) struct EventLoop {
    epoll: Epoll,
}

impl EventLoop {
    pub fn new() -> io::Result<Self> {
        Ok(EventLoop {
            epoll: Epoll::new()?,
        })
    }

    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    }

    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Blocks until at least one fd is ready; returns their tokens in `out`.
    pub fn wait(&self, out: &mut Vec<u64>) -> io::Result<()> {
        self.wait_timeout(out, -1)
    }

    /// Like [`EventLoop::wait`], but returns with `out` empty after `timeout_ms` (-1: never).
    pub fn wait_timeout(&self, out: &mut Vec<u64>, timeout_ms: i32) -> io::Result<()> {
        let mut events = [EpollEvent::default(); 8];
        loop {
            match self.epoll.wait(timeout_ms, &mut events) {
                Ok(n) => {
                    out.clear();
                    out.extend(events[..n].iter().map(|e| e.data()));
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Consumes a pending kick; an empty (EAGAIN) eventfd is fine, the queue is checked anyway.
pub(crate) fn drain(fd: &EventFd) {
    let _ = fd.read();
}
