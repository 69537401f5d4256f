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

pub use backend::NetBackend;
pub use port::VhostUserPort;
pub use server::VhostUserServer;

/// Guest receive queue (device writes frames) and transmit queue (device reads frames).
pub(crate) const RX_QUEUE: usize = 0;
pub(crate) const TX_QUEUE: usize = 1;
pub(crate) const NUM_QUEUES: usize = 2;
pub(crate) const QUEUE_SIZE: usize = 256;
/// `struct virtio_net_hdr_v1`: with VIRTIO_F_VERSION_1 every frame carries these 12 bytes.
pub(crate) const NET_HDR_LEN: usize = 12;

/// Guest RAM as the backend maps it: with a dirty bitmap the VMM's `SET_LOG_BASE` fills in.
pub(crate) type GuestMemoryMmap =
    vm_memory::GuestMemoryMmap<vhost_user_backend::bitmap::BitmapMmapRegion>;
/// A ring over that memory.
pub(crate) type Vring =
    vhost_user_backend::VringRwLock<vm_memory::GuestMemoryAtomic<GuestMemoryMmap>>;
