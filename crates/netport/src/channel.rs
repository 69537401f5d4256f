//! An in-process port pair: what one side sends, the other receives. Used by tests and to join
//! components living in the same process.

use std::os::unix::io::{AsRawFd, RawFd};

use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError, TrySendError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK, EFD_SEMAPHORE};

use crate::{FramePort, PortError};

/// Frames a channel holds before `send` reports [`PortError::Full`].
const CHANNEL_DEPTH: usize = 1024;

/// One end of an in-process port pair. Its `rx_fd` is an eventfd counting queued frames.
#[derive(Debug)]
pub struct ChannelPort {
    name: String,
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    /// Signalled by the peer on each send; drained by `recv`.
    rx_event: EventFd,
    /// The peer's `rx_event`, signalled on each send.
    peer_event: EventFd,
}

/// Makes two connected ports named `a` and `b`.
pub fn channel_pair(a: &str, b: &str) -> std::io::Result<(ChannelPort, ChannelPort)> {
    let (tx_ab, rx_ab) = bounded(CHANNEL_DEPTH);
    let (tx_ba, rx_ba) = bounded(CHANNEL_DEPTH);
    // Semaphore mode: each read takes one frame's worth, so the fd stays readable while frames wait.
    let ev_a = EventFd::new(EFD_NONBLOCK | EFD_SEMAPHORE)?;
    let ev_b = EventFd::new(EFD_NONBLOCK | EFD_SEMAPHORE)?;
    Ok((
        ChannelPort {
            name: a.to_string(),
            tx: tx_ab,
            rx: rx_ba,
            rx_event: ev_a.try_clone()?,
            peer_event: ev_b.try_clone()?,
        },
        ChannelPort {
            name: b.to_string(),
            tx: tx_ba,
            rx: rx_ab,
            rx_event: ev_b,
            peer_event: ev_a,
        },
    ))
}

impl FramePort for ChannelPort {
    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        match self.tx.try_send(frame.to_vec()) {
            Ok(()) => {
                // A failed signal (counter overflow) only loses a wake-up hint, not the frame.
                let _ = self.peer_event.write(1);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(PortError::Full),
            Err(TrySendError::Disconnected(_)) => Err(PortError::Disconnected),
        }
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        match self.rx.try_recv() {
            Ok(frame) => {
                let _ = self.rx_event.read();
                if frame.len() > buf.len() {
                    return Err(PortError::TooLong {
                        len: frame.len(),
                        cap: buf.len(),
                    });
                }
                buf[..frame.len()].copy_from_slice(&frame);
                Ok(Some(frame.len()))
            }
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(PortError::Disconnected),
        }
    }

    fn rx_fd(&self) -> RawFd {
        self.rx_event.as_raw_fd()
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_and_rx_fd_tracks_queue() {
        let (a, b) = channel_pair("a", "b").unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(b.recv(&mut buf).unwrap(), None);
        a.send(&[1, 2, 3]).unwrap();
        a.send(&[4]).unwrap();
        let mut pfd = libc::pollfd {
            fd: b.rx_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one valid pollfd with zero timeout.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 1);
        assert_eq!(b.recv(&mut buf).unwrap(), Some(3));
        assert_eq!(&buf[..3], &[1, 2, 3]);
        assert_eq!(b.recv(&mut buf).unwrap(), Some(1));
        pfd.revents = 0;
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
        b.send(&[9; 10]).unwrap();
        assert!(matches!(
            a.recv(&mut [0u8; 4]),
            Err(PortError::TooLong { len: 10, cap: 4 })
        ));
    }
}
