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

/// Largest frame a port with TSO offloads hands over or takes ([`FramePort::recv_vnet`],
/// [`FramePort::send_vnet`]): a 64 KiB TCP super-frame plus its Ethernet header and a VLAN tag.
pub const MAX_SUPER_FRAME: usize = 65536 + 18;

/// Length of the legacy `struct virtio_net_hdr` (flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset; little endian) that offloaded frames carry beside them.
pub const VNET_HDR_LEN: usize = 10;

/// What a port's far side takes with a virtio-net header ([`FramePort::send_vnet`]): a frame
/// whose checksum is still partial (`csum`), TCP super-frames to be segmented over IPv4
/// (`tso4`) or IPv6 (`tso6`). A port that takes nothing gets whole, plain frames only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
}

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

    /// The offloads [`FramePort::send_vnet`] accepts now (for a VM's NIC: what its driver
    /// negotiated, so it may change when the driver resets). Default: none.
    fn offloads(&self) -> Offloads {
        Offloads::default()
    }

    /// Limits what [`FramePort::recv_vnet`] may hand over from now on to what the receiver
    /// takes (a VM's driver that declined `GUEST_CSUM`/`GUEST_TSO*`): the far side then finishes
    /// checksums and segments itself. Frames already queued may still carry more. Default, for
    /// ports that never hand over offloaded frames: nothing to do.
    fn set_recv_offloads(&self, wanted: Offloads) -> Result<(), PortError> {
        let _ = wanted;
        Ok(())
    }

    /// Sends one frame with its virtio-net header `hdr`. Callers only pass headers that
    /// [`FramePort::offloads`] permits (others they resolve first: finish the checksum, cut
    /// the segments). The default, for ports without offloads, sends the frame alone.
    fn send_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), PortError> {
        let _ = hdr;
        self.send(frame)
    }

    /// Receives one frame and its virtio-net header (all zero for a plain frame): from a port
    /// with offloads, TCP may arrive as a super-frame with a partial checksum. The default
    /// receives a plain frame.
    fn recv_vnet(
        &self,
        hdr: &mut [u8; VNET_HDR_LEN],
        buf: &mut [u8],
    ) -> Result<Option<usize>, PortError> {
        *hdr = [0; VNET_HDR_LEN];
        self.recv(buf)
    }
}
