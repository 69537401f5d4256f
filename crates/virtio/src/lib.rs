//! Virtio devices as transport-independent models. A device offers features, exposes a config
//! space and, once the driver activates it, serves its queues on worker threads. The transport
//! (virtio-mmio in `vireo-vmm`, virtio-pci later) owns the registers, builds the queues and wires
//! kicks (ioeventfds) and interrupts (irqfds) to the device through [`VirtioDevice::activate`].
//!
//! Guest memory is a vm-memory mapping with a dirty bitmap, so every byte a device writes into the
//! guest (buffers, used rings) is recorded for live migration without extra work here.
#![forbid(unsafe_code)]

pub mod block;
mod chain;
mod device;
pub mod net;
mod notifier;
mod pause;
mod poll;
mod queue;
pub mod state;
mod worker;

pub use block::Block;
pub use device::{
    ActivateError, DirtyLog, DirtyLogError, ForeignFaults, ForeignMaps, PauseError, QueueHandle,
    VirtioDevice, VirtioInterrupt,
};
pub use net::Net;
pub use state::{DeviceState, QueueState, StateError};

/// Guest RAM as devices see it: mmap'd regions with a per-page dirty bitmap for VMM writes.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Virtio device type numbers (virtio 1.2 §5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
}

/// Feature bit every modern (non-legacy) device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Feature bit for used/avail event indexes (interrupt and kick suppression).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Feature bit for indirect descriptor tables (a whole request behind one ring descriptor).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

fn has_event_idx(acked_features: u64) -> bool {
    acked_features & VIRTIO_RING_F_EVENT_IDX != 0
}

/// Copies the part of `space` at `offset` into `data`; bytes past the end read as zero.
fn read_config_bytes(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < space.len() {
        let n = (space.len() - start).min(data.len());
        data[..n].copy_from_slice(&space[start..start + n]);
    }
}
