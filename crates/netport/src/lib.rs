//! Ethernet frames in and out of Vireo: one [`FramePort`] trait implemented by every place a frame
//! can come from or go to — a VM's virtio-net device, a switch port, a host TAP, an in-process
//! channel for tests. A virtio-net device and a switch port are each handed a `FramePort` and
//! never need to know what is on the other side.

mod channel;
mod error;
mod tap;

pub use channel::{channel_pair, ChannelPort};
pub use error::PortError;
pub use tap::TapPort;

use std::os::unix::io::RawFd;

/// Largest frame any port carries: 9014-byte jumbo frames plus a VLAN tag, rounded up.
pub const MAX_FRAME: usize = 9216;

/// A bidirectional, non-blocking Ethernet frame port. Frames carry no virtio-net header.
///
/// Methods take `&self` so one thread can receive while another sends.
pub trait FramePort: Send + Sync {
    /// Queues one frame for sending. `Err(PortError::Full)` when the peer cannot take it now
    /// (the caller may retry or drop, as a NIC would).
    fn send(&self, frame: &[u8]) -> Result<(), PortError>;
    /// Receives one frame into `buf`, returning its length, or `Ok(None)` when none is waiting.
    /// A frame longer than `buf` is dropped and reported as `Err(PortError::TooLong)`.
    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError>;
    /// A file descriptor that becomes readable when [`FramePort::recv`] has a frame, for epoll.
    fn rx_fd(&self) -> RawFd;
    /// A human-readable name (interface name, "chan-3", ...) for logs and status.
    fn name(&self) -> &str;
}
