//! The `VhostUserBackend` half: feature negotiation and memory updates from the VMM, kicks
//! forwarded to the port.
//!
//! Dirty log (live save and migration, docs/vm-state.md "The NIC's dirty log"): we offer
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD` and `VHOST_F_LOG_ALL`. Guest memory is mapped with
//! [`BitmapMmapRegion`] bitmaps, so once the VMM hands us its log with `SET_LOG_BASE` every
//! write through `GuestMemoryMmap` (receive buffers, used-ring entries and `used.idx`, both
//! rings) sets the bit of its guest page in the shared log, in the same call as the write and
//! so before `add_used` publishes it. Until then the bitmaps are empty and a write costs one
//! uncontended read lock. vhost-user-backend keeps logging after `SET_FEATURES` drops
//! `LOG_ALL`; the VMM ends logging by sending the memory table again, which maps fresh
//! regions without a log.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::port::{quiet_kicks, Shared};
use super::{is_tx, GuestMemoryMmap, Vring, NUM_QUEUES, QUEUE_SIZE};

/// The offload features offered: checksum and TSO for IPv4 and IPv6, guest to switch (`HOST_*`,
/// `CSUM`) and switch to guest (`GUEST_*`). No UFO and no ECN: a frame the receiver cannot take
/// is finished in software (`crate::uplink::offload`), which segments TCP only.
pub(crate) const OFFLOAD_FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6);

/// A feature switch read once from the environment: on unless set to `0`.
fn env_on(var: &str) -> bool {
    std::env::var(var).map_or(true, |v| v.trim() != "0")
}

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
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // Mergeable receive buffers (`rx.rs`); EVENT_IDX (`port.rs` keeps both rings quiet
        // with it); checksum and TSO offloads both ways: the guest's virtio_net_hdr crosses
        // the switch with the frame (docs/datapath.md, "Offloads"). LOG_ALL: we log our writes
        // (module docs). `VIREO_VHU_EVENT_IDX=0` / `VIREO_VHU_OFFLOAD=0` leave the feature
        // out, for before/after measurements.
        // MQ: up to `MAX_QUEUE_PAIRS` pairs, as many as the VMM starts (GET_QUEUE_NUM says
        // how many queues; the control queue and config space are the VMM's).
        let mut f = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        if env_on("VIREO_VHU_EVENT_IDX") {
            f |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if env_on("VIREO_VHU_OFFLOAD") {
            f |= OFFLOAD_FEATURES;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.shared.mergeable.store(
            features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            Ordering::Relaxed,
        );
        self.shared.acked.store(features, Ordering::Relaxed);
    }

    // PAGEFAULT: on a post-copy destination vhost-user-backend registers its mapping of guest
    // RAM with a userfaultfd it hands the VMM, so a frame never lands on a page still on the
    // source (docs/migration.md, "Post-copy with a vhost-user NIC").
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::PAGEFAULT
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
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // This ring thread wakes the switch thread on each TX kick: it runs at the switch
        // thread's priority (`priority.rs`), set once per thread.
        thread_local! {
            static PRIORITIZED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        if !PRIORITIZED.with(|p| p.replace(true)) {
            let _ = crate::priority::prioritize_current_thread();
        }
        // The first event after a ring starts hands us the rings; every TX kick wakes the
        // switch thread, which drains the ring itself.
        self.shared.attach_rings(vrings);
        let q = usize::from(device_event);
        if q >= NUM_QUEUES {
            return Ok(());
        }
        if is_tx(q) {
            self.shared.wake()?;
        } else if let (Some(rx), Some(mem)) = (vrings.get(q), self.shared.memory()) {
            // The switch never waits for receive buffers (a full ring drops the frame), so
            // the driver's kicks for new ones only cost it VM exits: turn them off.
            quiet_kicks(rx, &mem.memory());
        }
        Ok(())
    }
}
