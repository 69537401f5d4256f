//! Virtio devices as transport-independent models. A device offers features, exposes a config
//! space and, once the driver activates it, serves its queues on worker threads. The transport
//! (virtio-mmio in `vireo-vmm`, virtio-pci later) owns the registers, builds the queues and wires
//! kicks (ioeventfds) and interrupts (irqfds) to the device through [`VirtioDevice::activate`].
//!
//! Guest memory is a vm-memory mapping with a dirty bitmap, so every byte a device writes into the
//! guest (buffers, used rings) is recorded for live migration without extra work here.

mod device;

pub use device::{ActivateError, QueueHandle, VirtioDevice, VirtioInterrupt};

/// Guest RAM as devices see it: mmap'd regions with a per-page dirty bitmap for VMM writes.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Virtio device type numbers (virtio 1.2 §5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
}

/// Feature bit every modern (non-legacy) device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
