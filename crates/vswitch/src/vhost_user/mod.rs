//! VM NICs as switch ports with no kernel hop: the switch serves a vhost-user-net backend on a
//! Unix socket per port. The VMM shares the guest RAM (a memfd) and the virtqueues over the
//! socket; the switch thread then moves frames straight between the guest's rings and the
//! pipeline through a [`VhostUserPort`], an ordinary [`vireo_netport::FramePort`].
//!
//! The rust-vmm `vhost-user-backend` daemon handles the protocol on its own threads; its ring
//! thread only forwards the guest's TX kicks to the port's `rx_fd`, so frames are copied by the
//! switch thread alone (one lock order, no frame hand-off between threads).

mod backend;
mod port;
mod rx;
mod server;
mod spread;

pub use backend::NetBackend;
pub use port::VhostUserPort;
pub use server::VhostUserServer;

/// Receive/transmit queue pairs a port offers (`VIRTIO_NET_F_MQ`). Pair `p` is the guest's
/// receive queue `2p` (the switch writes frames) and transmit queue `2p + 1` (the switch reads
/// them); a driver without multiqueue uses pair 0 only. The control queue, if any, is the VMM's
/// (it turns pairs on and off with `SET_VRING_ENABLE`), never ours.
pub(crate) const MAX_QUEUE_PAIRS: usize = 4;
pub(crate) const NUM_QUEUES: usize = 2 * MAX_QUEUE_PAIRS;

/// Queue `q` is a transmit queue (odd) rather than a receive queue (even).
pub(crate) fn is_tx(q: usize) -> bool {
    q % 2 == 1
}
pub(crate) const QUEUE_SIZE: usize = 256;
/// `struct virtio_net_hdr_v1`: with VIRTIO_F_VERSION_1 every frame carries these 12 bytes.
pub(crate) const NET_HDR_LEN: usize = 12;

/// Guest RAM as the backend maps it: with a dirty bitmap the VMM's `SET_LOG_BASE` fills in.
pub(crate) type GuestMemoryMmap =
    vm_memory::GuestMemoryMmap<vhost_user_backend::bitmap::BitmapMmapRegion>;
/// A ring over that memory.
pub(crate) type Vring =
    vhost_user_backend::VringRwLock<vm_memory::GuestMemoryAtomic<GuestMemoryMmap>>;
