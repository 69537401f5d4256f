//! Own minimal virtio drivers (modern virtio-mmio, split queues, polling).

pub mod blk;
pub mod mmio;
pub mod net;
pub mod queue;
