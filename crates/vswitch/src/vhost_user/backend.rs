//! The `VhostUserBackend` half: feature negotiation and memory updates from the VMM, kicks
//! forwarded to the port.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::port::Shared;
use super::{NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};

/// The backend the `vhost-user-backend` daemon drives; shares its state with one
/// [`super::VhostUserPort`].
#[derive(Clone)]
pub struct NetBackend {
    pub(crate) shared: Arc<Shared>,
    /// Stops the daemon's ring thread when the session ends (the daemon joins it).
    exit: Arc<(EventConsumer, EventNotifier)>,
}

impl NetBackend {
    pub(crate) fn new(shared: Arc<Shared>) -> io::Result<Self> {
        Ok(NetBackend {
            shared,
            exit: Arc::new(new_event_consumer_and_notifier(EventFlag::NONBLOCK)?),
        })
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // Mergeable receive buffers (`rx.rs`); no offloads yet: frames cross the switch whole
        // and plain.
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.shared.mergeable.store(
            features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            Ordering::Relaxed,
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::empty()
    }

    // The rings apply EVENT_IDX themselves (the daemon configures them); nothing else changes.
    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.shared.set_memory(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn reset_device(&self) {
        self.shared.detach_rings();
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // The first event after a ring starts hands us the rings; every TX kick wakes the
        // switch thread, which drains the ring itself.
        self.shared.attach_rings(vrings);
        match device_event as usize {
            TX_QUEUE => self.shared.wake()?,
            // The switch never waits for receive buffers (a full ring drops the frame), so
            // the driver's kicks for new ones only cost it VM exits: turn them off.
            RX_QUEUE => {
                if let Some(rx) = vrings.get(RX_QUEUE) {
                    let _ = rx.disable_notification();
                }
            }
            _ => {}
        }
        Ok(())
    }
}
